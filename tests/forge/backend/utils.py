import torch


def fp16_fix(x):
    """Mirrors backend/utils.py fp16_fix: fp16 activations clipped to ±32768, others unchanged."""
    return x.clip(-32768.0, 32768.0) if x.dtype == torch.float16 else x


def pad_to_patch_size(img, patch_size=(2, 2)):
    """Mirrors Forge Neo's backend/utils.py pad_to_patch_size: circular padding at the end of each
    dimension after the first two up to a multiple of ``patch_size`` (Flux: ``(2, 2)`` on 4-D latents;
    Qwen-Image: ``(1, 2, 2)`` on 5-D ones)."""
    pad = ()
    for i, size in enumerate(img.shape[2:]):
        pad = (0, (patch_size[i] - size % patch_size[i]) % patch_size[i], *pad)
    return torch.nn.functional.pad(img, pad, mode="circular")
