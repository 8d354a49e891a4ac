"""Accelerator table: dense BF16 peak, memory, TDP and a default price per GPU-hour.

Peaks are dense tensor-core BF16 (FP16 for V100, which has no BF16) from the vendors'
datasheets; headline numbers marked as 2:4-sparse are halved. The training loop calls
`peak_flops(torch.cuda.get_device_name())` for MFU: an unknown device gives None and MFU
is reported as n/a, never a guess.

Prices are ASSUMPTIONS, not quotes: rough 2024-25 on-demand cloud rates per GPU-hour,
rounded, to make dollar figures order-of-magnitude right. Pass --price-per-gpu-hour for a
real quote. The V100 rate is the $1.48/h behind Lambda Labs' 2020 GPT-3 estimate.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from kiln.errors import KilnError


@dataclass(frozen=True)
class Accelerator:
    name: str  # the CLI name
    title: str
    peak_tflops: float  # dense BF16 (FP16 on V100)
    memory_gb: float  # usable device memory, GB (1e9 bytes) as the vendor states it
    tdp_w: float | None  # board power; None where the vendor gives a per-chip figure we lack
    price_usd_per_hour: float  # assumption, see module docstring
    price_note: str = "assumed on-demand cloud rate (2024-25, rounded)"

    @property
    def peak_flops(self) -> float:
        return self.peak_tflops * 1e12

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * 1e9


GPUS: dict[str, Accelerator] = {a.name: a for a in (
    Accelerator("v100", "NVIDIA V100 SXM2 32GB", 125, 32, 300, 1.48, "Lambda Labs 2020 GPT-3 estimate"),
    Accelerator("v100-16gb", "NVIDIA V100 SXM2 16GB", 125, 16, 300, 1.48, "Lambda Labs 2020 GPT-3 estimate"),
    Accelerator("a100-40gb", "NVIDIA A100 SXM 40GB", 312, 40, 400, 1.30),
    Accelerator("a100", "NVIDIA A100 SXM 80GB", 312, 80, 400, 1.80),
    Accelerator("a100-pcie-40gb", "NVIDIA A100 PCIe 40GB", 312, 40, 250, 1.20),
    Accelerator("a100-pcie", "NVIDIA A100 PCIe 80GB", 312, 80, 300, 1.60),
    Accelerator("h100", "NVIDIA H100 SXM 80GB", 989, 80, 700, 3.00),
    Accelerator("h100-pcie", "NVIDIA H100 PCIe 80GB", 756, 80, 350, 2.50),
    Accelerator("h200", "NVIDIA H200 SXM 141GB", 989, 141, 700, 3.50),
    Accelerator("b200", "NVIDIA B200 (HGX) ~180GB", 2250, 180, 1000, 5.50),
    Accelerator("mi300x", "AMD Instinct MI300X 192GB", 1307, 192, 750, 3.00),
    Accelerator("tpu-v4", "Google TPU v4", 275, 32 * 1.073741824, None, 3.22, "assumed Google list rate per chip-hour"),
    Accelerator("tpu-v5e", "Google TPU v5e", 197, 16, None, 1.20, "assumed Google list rate per chip-hour"),
    Accelerator("tpu-v5p", "Google TPU v5p", 459, 95, None, 4.20, "assumed Google list rate per chip-hour"),
)}

ALIASES = {"h100-sxm": "h100", "h100-80gb": "h100", "h200-sxm": "h200", "a100-80gb": "a100",
           "a100-sxm": "a100", "a100-sxm-80gb": "a100", "a100-sxm-40gb": "a100-40gb",
           "a100-pcie-80gb": "a100-pcie", "v100-32gb": "v100", "v100-sxm2": "v100"}

# (pattern on torch.cuda.get_device_name(), table key). Order matters: specific first.
# Variants not in the table (H100 NVL, H200 NVL, GH200, V100 PCIe, L40S, ...) match nothing.
_DEVICE_PATTERNS = (
    (r"\bH100\b.*\bPCIe\b", "h100-pcie"),
    (r"\bH100\b.*\bNVL\b", None),
    (r"\bH100\b.*(SXM|HBM3)", "h100"),
    (r"\bH200\b.*\bNVL\b", None),
    (r"\bGH200\b", None),
    (r"^NVIDIA H200$", "h200"),
    (r"\bH200\b.*SXM", "h200"),
    (r"\bA100\b.*PCIE.*40GB|\bA100\b.*40GB.*PCIE", "a100-pcie-40gb"),
    (r"\bA100\b.*PCIE", "a100-pcie"),
    (r"\bA100\b.*SXM.*40GB", "a100-40gb"),
    (r"\bA100\b.*SXM.*80GB", "a100"),
    (r"\bV100\b.*SXM2.*16GB", "v100-16gb"),
    (r"\bV100\b.*SXM2.*32GB", "v100"),
    (r"\bB200\b", "b200"),
    (r"\bMI300X\b", "mi300x"),
)


def lookup(name: str) -> Accelerator:
    """A table entry by CLI name (case-insensitive); unknown names list the known ones."""
    key = name.strip().lower().replace("_", "-").removeprefix("nvidia-")
    key = ALIASES.get(key, key)
    if key not in GPUS:
        raise KilnError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def accelerator_for_device(device_name: str | None) -> Accelerator | None:
    """The table entry for a `torch.cuda.get_device_name()` string, or None."""
    if not device_name:
        return None
    for pattern, key in _DEVICE_PATTERNS:
        if re.search(pattern, device_name.strip(), re.IGNORECASE):
            return GPUS[key] if key else None
    return None


def peak_flops(device_name: str | None) -> float | None:
    """Dense BF16 peak FLOP/s for a torch device name; None for CPU or anything not in the table."""
    acc = accelerator_for_device(device_name)
    return acc.peak_flops if acc else None
