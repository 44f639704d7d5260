"""loracook: declarative YAML recipes for merging, extracting and evaluating LoRA adapters."""

__version__ = "0.1.0"
