import torch


def fp16_fix(x):
    """Mirrors backend/utils.py fp16_fix: fp16 activations clipped to ±32768, others unchanged."""
    return x.clip(-32768.0, 32768.0) if x.dtype == torch.float16 else x


def pad_to_patch_size(img, patch_size=(2, 2)):
    """Mirrors Forge Neo's backend/utils.py pad_to_patch_size: circular padding at the end of the
    last two dimensions up to multiples of ``patch_size``."""
    pad_h = (patch_size[0] - img.shape[-2] % patch_size[0]) % patch_size[0]
    pad_w = (patch_size[1] - img.shape[-1] % patch_size[1]) % patch_size[1]
    return torch.nn.functional.pad(img, (0, pad_w, 0, pad_h), mode="circular")
