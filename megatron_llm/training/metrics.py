"""Throughput and model-FLOPs utilisation."""

import os
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
