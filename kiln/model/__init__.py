"""Llama-style decoder in plain PyTorch and its attention backends."""
from kiln.model.llama import Transformer, count_params, flops_per_token

__all__ = ["Transformer", "count_params", "flops_per_token"]
