"""scd-pipeline: scheduled checkpoint distillation for domain LLMs."""
__version__ = "0.1.0"
