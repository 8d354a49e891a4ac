"""Offline checkpoint conversion: kiln <-> Hugging Face, Megatron-Core, DeepSpeed, across layouts.

Every reader presents a checkpoint as kiln-named tensors (kiln.convert.names); kiln.checkpoint owns
the run-time save/load and kiln's own format, which these converters read and write.
"""
