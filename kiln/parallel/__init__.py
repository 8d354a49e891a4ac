"""Device mesh, tensor/sequence parallel, FSDP2/HSDP, pipeline stages, DeepSpeed engine."""
from kiln.parallel.mesh import ParallelDims, check_layout
from kiln.parallel.runtime import ParallelRuntime, setup_parallel

__all__ = ["ParallelDims", "ParallelRuntime", "check_layout", "setup_parallel"]
