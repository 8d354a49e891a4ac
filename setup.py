import shutil
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py


class BuildPyWithConfigs(build_py):
    """Ship the repository's configs/ inside the package (kiln/configs), so that
    `kiln train configs/train/quickstart.yaml` finds kiln's recipes from any directory."""

    def run(self):
        super().run()
        if not self.dry_run and Path("configs").is_dir():
            shutil.copytree("configs", Path(self.build_lib) / "kiln" / "configs", dirs_exist_ok=True)


setup(
    name="kiln",
    version="0.1.0",
    description="Plan, launch and run distributed LLM pretraining",
    packages=find_packages(include=["kiln", "kiln.*"]),
    package_data={"kiln": ["py.typed"]},
    python_requires=">=3.10",
    # Ranges that torch 2.13.0 satisfies: install torch==2.13.0 first so pip never
    # resolves a CUDA build on a CPU machine.
    install_requires=[
        "torch>=2.6,<2.14",
        "omegaconf>=2.3",
        "webdataset>=0.2.100",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tqdm>=4.60",
        "tensorboard>=2.14",
        "pyarrow>=14",
        "matplotlib>=3.7",
        "scipy>=1.10",
        "threadpoolctl>=3",
    ],
    extras_require={
        "gpu": ["flash-attn>=2.6"],
        "deepspeed": ["deepspeed>=0.15"],
        "mpi": ["mpi4py>=4.0", "mpich"],
        "megatron": ["megatron-core>=0.12"],
        "hf": ["transformers>=4.45", "datasets>=2.16"],
        # mlflow-skinny: the tracking client and its file store, without the server's dependencies
        "trackers": ["wandb>=0.17", "mlflow-skinny>=2.10"],
        "dev": ["pytest>=8", "pytest-timeout", "psutil", "transformers>=4.45", "datasets>=2.16", "wandb>=0.17",
                "mlflow-skinny>=2.10", "megatron-core>=0.12",
                "mpi4py>=4.0", "mpich", "deepspeed>=0.15"],
    },
    cmdclass={"build_py": BuildPyWithConfigs},
    entry_points={"console_scripts": ["kiln=kiln.cli:main"]},
)
