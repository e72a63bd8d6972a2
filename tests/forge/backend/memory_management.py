"""Stand-in of Forge Neo's ``backend/memory_management.py``: the helpers its ERNIE-Image, Krea 2 and
Wan models import (exo101/sd-webui-forge-neo-v3 @ 5692d2d1), on a CPU-only machine."""

import torch


def supports_fp64(device: torch.device) -> bool:
    """Neo: False on MPS, Intel XPU and DirectML (ERNIE-Image then makes its RoPE tables on the CPU)."""
    return torch.device(device).type not in ("mps", "xpu")


def cast_to(weight, dtype=None, device=None, non_blocking=False, copy=False, *, context=None):
    """Neo: the weight itself when dtype and device already fit, else a converted copy."""
    if (device is None or weight.device == torch.device(device)) and not copy and (dtype is None or weight.dtype == dtype):
        return weight
    return weight.to(dtype=dtype, device=device, copy=copy)


def cast_to_device(tensor, device, dtype, copy=False):
    """Neo: a copy in the given dtype on the given device, as ``Tensor.to``."""
    return tensor.to(device=device, dtype=dtype, copy=copy)
