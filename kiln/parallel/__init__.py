"""Device mesh, tensor/sequence parallel, FSDP2/HSDP, pipeline stages, DeepSpeed engine."""
from kiln.parallel.runtime import ParallelRuntime, setup_parallel

__all__ = ["ParallelRuntime", "setup_parallel"]
