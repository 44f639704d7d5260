from loracook.cli import main

raise SystemExit(main())
