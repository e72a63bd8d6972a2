import torch


def fp16_fix(x):
    """Mirrors backend/utils.py fp16_fix: fp16 activations clipped to ±32768, others unchanged."""
    return x.clip(-32768.0, 32768.0) if x.dtype == torch.float16 else x


def pad_to_patch_size(img, patch_size=(2, 2)):
    """Mirrors Forge Neo's backend/utils.py pad_to_patch_size: circular padding at the end of each
    dimension after the first two up to multiples of ``patch_size`` (2 of them for images, 3 for
    Wan's and Anima's videos)."""
    pad = ()
    for i in range(img.ndim - 2):
        pad = (0, (patch_size[i] - img.shape[i + 2] % patch_size[i]) % patch_size[i], *pad)
    return torch.nn.functional.pad(img, pad, mode="circular")
