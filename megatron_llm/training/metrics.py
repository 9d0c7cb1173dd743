"""Throughput, model-FLOPs utilisation and process memory."""

import os
import resource
from typing import Optional

import torch

# Dense bf16 peak (FLOP/s) without sparsity, by substring of the CUDA device name. MEGATRON_LLM_PEAK_FLOPS
# overrides it for other devices.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12}


def peak_flops(device: torch.device) -> Optional[float]:
    if "MEGATRON_LLM_PEAK_FLOPS" in os.environ:
        return float(os.environ["MEGATRON_LLM_PEAK_FLOPS"])
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def resident_bytes() -> int:
    """This process's resident memory now."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_resident_bytes() -> int:
    """The most resident memory this process has held so far."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # ru_maxrss is in KiB
