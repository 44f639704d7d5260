"""Offline mode and the lazy import of lm-eval.

Evaluation never touches the network: the Hugging Face hub, datasets and evaluate libraries each read an
"offline" switch from the environment when they are imported, so :func:`ensure_offline` sets the switches
(unless the user set them explicitly) and also flips the constants of libraries that were imported earlier.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from loracook.errors import BadInput

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE")
INSTALL_HINT = "pip install 'loracook[eval]'"


def ensure_offline() -> None:
    """Switch the hub, datasets and evaluate libraries to offline mode (an explicit ``=0`` is respected).

    >>> ensure_offline(); os.environ["HF_DATASETS_OFFLINE"] in {"0", "1"}
    True
    """
    for name in OFFLINE_VARIABLES:
        os.environ.setdefault(name, "1")
    hub_offline = os.environ["HF_HUB_OFFLINE"] not in {"0", "false", "False", "FALSE", ""}
    data_offline = os.environ["HF_DATASETS_OFFLINE"] not in {"0", "false", "False", "FALSE", ""}
    # Libraries read these variables once, at import: fix up the ones that were imported before us.
    if (constants := sys.modules.get("huggingface_hub.constants")) is not None and hub_offline:
        constants.HF_HUB_OFFLINE = True
    if (config := sys.modules.get("datasets.config")) is not None and data_offline:
        config.HF_HUB_OFFLINE = True
        config.HF_DATASETS_OFFLINE = True
    if (config := sys.modules.get("evaluate.config")) is not None:
        config.HF_EVALUATE_OFFLINE = os.environ["HF_EVALUATE_OFFLINE"] not in {"0", "false", "False", ""}


def import_lm_eval() -> ModuleType:
    """Import lm-eval in offline mode, or raise :class:`BadInput` with the install hint."""
    ensure_offline()
    try:
        import lm_eval
        import lm_eval.tasks  # noqa: F401  (the task loader and manager)
    except ImportError as exc:
        raise BadInput(f"lm-eval is not installed ({exc.name} is missing)", fix=INSTALL_HINT) from None
    return lm_eval
