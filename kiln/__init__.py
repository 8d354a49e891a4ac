"""kiln: plan, launch and run LLM pretraining."""

__version__ = "0.1.0"
