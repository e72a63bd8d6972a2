"""PiD on Forge Neo (NVIDIA's pixel-space super-resolution DiT, ``backend/nn/pixeldit/model.py`` and
``pid.py``, read in exo101/sd-webui-forge-neo-v3 @ 5692d2d1; Neo's port of ComfyUI v0.24.1
``comfy/ldm/pixeldit``): recognised so that NAG can say why it stands aside. Its text (Gemma-2 2B)
reaches the image only through the MM-DiT joint attention of its patch blocks (``patch_blocks.N.attn``,
one attention over ``[text; image]`` with a text stream updated in every block), not through a
cross-attention; its pixel blocks have no text. NAG would have to run the whole model with a NAG text
stream, as it does for SD3 (``mmdit``); it does not yet. No host runs a pass for it.
"""

from __future__ import annotations

from typing import Any

from ..webui.family import ModelFamily


def is_pid(model: Any) -> bool:
    """PiD's network: patch blocks whose joint attention has a text stream (``qkv_y``), and pixel blocks."""
    blocks = getattr(model, "patch_blocks", None)
    return bool(blocks) and hasattr(model, "pixel_blocks") and all(hasattr(getattr(block, "attn", None), "qkv_y") for block in blocks)


def unsupported(model: Any) -> str:
    if not is_pid(model):
        return ""
    return "PiD's text reaches the image through MM-DiT joint attention (its patch blocks), not cross-attention; NAG does not run it yet"


FAMILY = ModelFamily("PiD", {}, is_pid, unsupported)
