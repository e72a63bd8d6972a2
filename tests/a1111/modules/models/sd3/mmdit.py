"""Mirrors modules/models/sd3/mmdit.py of A1111 v1.10.1 (82a973c0; Stability AI's SD3 reference
MMDiT): the same class and attribute names and order of operations, written from its behaviour.
Sizes are constructor arguments (hidden size 64·depth and depth heads, as the host's "magic"), so
the tests build tiny models; ``pos_embed`` is a buffer of ``pos_embed_max_size²`` positions.

Left out: ``rmsnorm``, ``scale_mod_only``, ``swiglu`` and register tokens (SD3 Medium uses none:
``sd3_impls.BaseModel`` builds the MMDiT without them), ``learn_sigma``, the ``ln`` qk-norm, the
unused ``attn_mode`` and the asserts. ``qk_norm="rms"`` is kept: the host's class has it, though
its SD3 model is built without it."""

import math

import torch
from einops import rearrange
from torch import nn

from modules.models.sd3.other_impls import Mlp, attention


class PatchEmbed(nn.Module):
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32) / half).to(device=t.device)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return embedding.to(dtype=t.dtype) if torch.is_floating_point(t) else embedding

    def forward(self, t, dtype, **kwargs):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class VectorEmbedder(nn.Module):
    def __init__(self, input_dim, hidden_size):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(input_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, x):
        return self.mlp(x)


class QkvLinear(torch.nn.Linear):
    pass


def split_qkv(qkv, head_dim):
    qkv = qkv.reshape(qkv.shape[0], qkv.shape[1], 3, -1, head_dim).movedim(2, 0)
    return qkv[0], qkv[1], qkv[2]


class RMSNorm(torch.nn.Module):
    """Over the last dimension, eps inside the root, an affine weight."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(device=x.device, dtype=x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=False, pre_only=False, qk_norm=None):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = QkvLinear(dim, dim * 3, bias=qkv_bias)
        if not pre_only:
            self.proj = nn.Linear(dim, dim)
        self.pre_only = pre_only
        self.ln_q = RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()
        self.ln_k = RMSNorm(self.head_dim) if qk_norm == "rms" else nn.Identity()

    def pre_attention(self, x):
        """q and k ``[B, L, H·Dh]`` (normed per head), v ``[B, L, H, Dh]``."""
        q, k, v = split_qkv(self.qkv(x), self.head_dim)
        q = self.ln_q(q).reshape(q.shape[0], q.shape[1], -1)
        k = self.ln_k(k).reshape(q.shape[0], q.shape[1], -1)
        return (q, k, v)

    def post_attention(self, x):
        return self.proj(x)


class DismantledBlock(nn.Module):
    """adaLN block, dismantled into ``pre_attention`` and ``post_attention`` for the joint attention;
    a ``pre_only`` block (the last context block) has 2 modulations and no output side."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, qkv_bias=False, pre_only=False, qk_norm=None):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, pre_only=pre_only, qk_norm=qk_norm)
        if not pre_only:
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (2 if pre_only else 6) * hidden_size))
        self.pre_only = pre_only

    def pre_attention(self, x, c):
        if not self.pre_only:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            qkv = self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa))
            return qkv, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp)
        shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.attn.pre_attention(modulate(self.norm1(x), shift_msa, scale_msa)), None

    def post_attention(self, attn, x, gate_msa, shift_mlp, scale_mlp, gate_mlp):
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def block_mixing(context, x, context_block, x_block, c):
    """Joint attention over ``[context; x]`` tokens; the context is dropped after a ``pre_only`` block."""
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    x_qkv, x_intermediates = x_block.pre_attention(x, c)
    q, k, v = (torch.cat((context_qkv[t], x_qkv[t]), dim=1) for t in range(3))
    attn = attention(q, k, v, x_block.attn.num_heads)
    context_attn, x_attn = attn[:, : context_qkv[0].shape[1]], attn[:, context_qkv[0].shape[1] :]
    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_intermediates)
    return context, x_block.post_attention(x_attn, *x_intermediates)


class JointBlock(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        pre_only = kwargs.pop("pre_only")
        self.context_block = DismantledBlock(*args, pre_only=pre_only, **kwargs)
        self.x_block = DismantledBlock(*args, pre_only=False, **kwargs)

    def forward(self, *args, **kwargs):
        return block_mixing(*args, context_block=self.context_block, x_block=self.x_block, **kwargs)


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class MMDiT(nn.Module):
    def __init__(
        self,
        patch_size=2,
        in_channels=16,
        depth=2,
        mlp_ratio=4.0,
        adm_in_channels=None,
        context_in=None,
        pos_embed_max_size=8,
        qk_norm=None,
    ):
        super().__init__()
        self.in_channels = self.out_channels = in_channels
        self.patch_size = patch_size
        self.pos_embed_max_size = pos_embed_max_size
        hidden_size, num_heads = 64 * depth, depth
        self.num_heads = num_heads
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        if adm_in_channels is not None:
            self.y_embedder = VectorEmbedder(adm_in_channels, hidden_size)
        self.context_embedder = nn.Linear(context_in, hidden_size) if context_in is not None else nn.Identity()
        self.register_length = 0
        self.register_buffer("pos_embed", torch.zeros(1, pos_embed_max_size**2, hidden_size))
        self.joint_blocks = nn.ModuleList(
            JointBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qkv_bias=True, pre_only=i == depth - 1, qk_norm=qk_norm)
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)

    def cropped_pos_embed(self, hw):
        """The centre ``h/p × w/p`` of the ``pos_embed_max_size²`` grid, ``[1, tokens, D]``."""
        p = self.x_embedder.patch_size[0]
        h, w = hw[0] // p, hw[1] // p
        top, left = (self.pos_embed_max_size - h) // 2, (self.pos_embed_max_size - w) // 2
        grid = rearrange(self.pos_embed, "1 (h w) c -> 1 h w c", h=self.pos_embed_max_size, w=self.pos_embed_max_size)
        return rearrange(grid[:, top : top + h, left : left + w, :], "1 h w c -> 1 (h w) c")

    def unpatchify(self, x, hw=None):
        c, p = self.out_channels, self.x_embedder.patch_size[0]
        h, w = hw[0] // p, hw[1] // p
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(shape=(x.shape[0], h, w, p, p, c)))
        return x.reshape(shape=(x.shape[0], c, h * p, w * p))

    def forward_core_with_concat(self, x, c_mod, context=None):
        for block in self.joint_blocks:
            context, x = block(context, x, c=c_mod)
        return self.final_layer(x, c_mod)

    def forward(self, x, t, y=None, context=None):
        """``t`` is σ·1000 (``sd3_impls.BaseModel.apply_model``), ``y`` the pooled CLIP vector."""
        hw = x.shape[-2:]
        x = self.x_embedder(x) + self.cropped_pos_embed(hw)
        c = self.t_embedder(t, dtype=x.dtype)
        if y is not None:
            c = c + self.y_embedder(y)
        context = self.context_embedder(context)
        x = self.forward_core_with_concat(x, c, context)
        return self.unpatchify(x, hw=hw)
