"""lorabench: compare LoRA-family fine-tuning methods on GLUE under equal parameter budgets."""

__version__ = "0.1.0"
