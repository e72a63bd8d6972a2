"""Mirrors the structure of Forge Neo's PiD network (read in the copy exo101/sd-webui-forge-neo-v3 @
5692d2d1e6c293faf5486f7cb18c27c9a3faa758, ``webui/backend/nn/pixeldit/model.py``, ``modules.py`` and
``pid.py``; Neo's port of ComfyUI v0.24.1 comfy/ldm/pixeldit): the module tree NAG looks at to recognise
it, with Neo's class and attribute names. ``PidNet(PixDiT_T2I)``: ``y_embedder`` (the Gemma-2 context
to the width), ``patch_blocks`` of ``MMDiTBlockT2I`` whose ``attn`` is an ``MMDiTJointAttention`` (fused
``qkv_x``/``qkv_y``, per-head ``q_norm_x``/``k_norm_x``/``q_norm_y``/``k_norm_y``, ``proj_x``/``proj_y``: one
attention over ``[text; image]``), and ``pixel_blocks`` of ``PiTBlock`` whose ``RotaryAttention`` (``qkv``,
``q_norm``, ``k_norm``, ``proj``) sees no text.

Left out: every forward, the embedders, MLPs, modulations and the LQ projection (NAG stands aside from
PiD before any call; see lib_nag/models/pid.py)."""

from torch import nn


class MMDiTJointAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv_x = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.qkv_y = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm_x = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm_x = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.q_norm_y = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_norm_y = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.proj_x = nn.Linear(dim, dim)
        self.proj_y = nn.Linear(dim, dim)


class MMDiTBlockT2I(nn.Module):
    def __init__(self, hidden_size, groups):
        super().__init__()
        self.norm_x1 = nn.RMSNorm(hidden_size, eps=1e-6)
        self.norm_y1 = nn.RMSNorm(hidden_size, eps=1e-6)
        self.attn = MMDiTJointAttention(hidden_size, num_heads=groups, qkv_bias=False)


class RotaryAttention(nn.Module):
    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.k_norm = nn.RMSNorm(dim // num_heads, eps=1e-6)
        self.proj = nn.Linear(dim, dim)


class PiTBlock(nn.Module):
    def __init__(self, attn_hidden_size, attn_num_heads):
        super().__init__()
        self.attn = RotaryAttention(attn_hidden_size, num_heads=attn_num_heads)


class PixDiT_T2I(nn.Module):
    def __init__(
        self, num_groups=2, hidden_size=16, pixel_attn_hidden_size=8, pixel_num_groups=2, patch_depth=2, pixel_depth=1, txt_embed_dim=12
    ):
        super().__init__()
        self.y_embedder = nn.Linear(txt_embed_dim, hidden_size)
        self.patch_blocks = nn.ModuleList([MMDiTBlockT2I(hidden_size, num_groups) for _ in range(patch_depth)])
        self.pixel_blocks = nn.ModuleList([PiTBlock(pixel_attn_hidden_size, pixel_num_groups) for _ in range(pixel_depth)])


class PidNet(PixDiT_T2I):
    pass
