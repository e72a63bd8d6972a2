import torch


def fp16_fix(x):
    """Mirrors backend/utils.py fp16_fix: fp16 activations clipped to ±32768, others unchanged."""
    return x.clip(-32768.0, 32768.0) if x.dtype == torch.float16 else x
