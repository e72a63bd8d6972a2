"""Mirrors backend/nn/flux.py of Forge main dfdcbab6 (Flux.1): the same classes, attribute names and
order of operations, written from its behaviour. Sizes are constructor arguments, so tests build
tiny models."""

import math

import torch
from einops import rearrange, repeat
from torch import nn

from backend.attention import attention_function
from backend.utils import fp16_fix


def attention(q, k, v, pe):
    """RoPE on q and k, then the backend attention on ``[B, H, L, Dh]``, heads merged."""
    q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], skip_reshape=True)


def rope(pos, dim, theta):
    """``[B, L, dim/2, 2, 2]`` rotation matrices, angles computed in float64, returned in float32."""
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.unsqueeze(-1) * omega.unsqueeze(0)
    cos, sin = torch.cos(angles), torch.sin(angles)
    rotation = torch.stack([cos, -sin, sin, cos], dim=-1)
    return rotation.view(*rotation.shape[:-1], 2, 2).float()


def apply_rope(xq, xk, freqs_cis):
    def rotate(x):
        pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        return (freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]).reshape(*x.shape).type_as(x)

    return rotate(xq), rotate(xk)


def timestep_embedding(t, dim, max_period=10000, time_factor=1000.0):
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(start=0, end=half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
    return embedding.to(t) if torch.is_floating_point(t) else embedding


class EmbedND(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = axes_dim

    def forward(self, ids):
        return torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-3).unsqueeze(1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim, hidden_dim, bias=True):  # ``bias``: Neo's (Flux.2 has none); Forge main always has them
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=bias)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=bias)

    def forward(self, x):
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))
        self.eps = 1e-6

    def forward(self, x):
        return torch.rms_norm(x, [x.shape[-1]], self.scale.to(x.dtype), self.eps)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        q, k = self.query_norm(q), self.key_norm(k)
        return q.to(k), k.to(q)


class SelfAttention(nn.Module):
    """Only its submodules are used: the blocks call ``qkv``, ``norm`` and ``proj`` themselves."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)


class Modulation(nn.Module):
    """``vec [B, D]`` → 6 (double) or 3 (single) tensors ``[B, 1, D]``: shift, scale, gate (twice)."""

    def __init__(self, dim, double):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        return self.lin(nn.functional.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)


def split_heads(qkv, heads):
    """``[B, L, 3·H·Dh]`` → q, k, v ``[B, H, L, Dh]`` (views)."""
    batch, tokens, width = qkv.shape
    return qkv.view(batch, tokens, 3, heads, width // (3 * heads)).permute(2, 0, 3, 1, 4)


def mlp(hidden_size, mlp_ratio):
    hidden = int(hidden_size * mlp_ratio)
    return nn.Sequential(nn.Linear(hidden_size, hidden, bias=True), nn.GELU(approximate="tanh"), nn.Linear(hidden, hidden_size, bias=True))


class DoubleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = mlp(hidden_size, mlp_ratio)
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = mlp(hidden_size, mlp_ratio)

    def forward(self, img, txt, vec, pe):
        img_mods, txt_mods = self.img_mod(vec), self.txt_mod(vec)
        return self.modulated_forward(img, txt, (img_mods[:3], img_mods[3:]), (txt_mods[:3], txt_mods[3:]), pe)

    def modulated_forward(self, img, txt, img_mods, txt_mods, pe):
        """The block after its modulation layers: ``*_mods`` are two (shift, scale, gate) triples per
        stream (Forge writes this inline; Chroma's blocks, without modulation layers, share it here)."""
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = img_mods
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = txt_mods
        img_q, img_k, img_v = split_heads(self.img_attn.qkv((1 + img_scale1) * self.img_norm1(img) + img_shift1), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = split_heads(self.txt_attn.qkv((1 + txt_scale1) * self.txt_norm1(txt) + txt_shift1), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe=pe)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp((1 + img_scale2) * self.img_norm2(img) + img_shift2)
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp((1 + txt_scale2) * self.txt_norm2(txt) + txt_shift2)
        return img, fp16_fix(txt)


class SingleStreamBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x, vec, pe):
        return self.modulated_forward(x, self.modulation(vec), pe)

    def modulated_forward(self, x, modulation, pe):
        """The block after its modulation layer: ``modulation`` is (shift, scale, gate)."""
        shift, scale, gate = modulation
        qkv, hidden = torch.split(self.linear1((1 + scale) * self.pre_norm(x) + shift), [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe)
        output = self.linear2(torch.cat((attn, self.mlp_act(hidden)), dim=2))
        return fp16_fix(x + gate * output)


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x, vec):
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(
        self, in_channels, vec_in_dim, context_in_dim, hidden_size, mlp_ratio, num_heads, depth, depth_single_blocks, axes_dim, theta,
        qkv_bias, guidance_embed,
    ):  # fmt: skip
        super().__init__()
        self.guidance_embed = guidance_embed
        self.in_channels = in_channels * 4
        self.out_channels = self.in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pe_embedder = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=axes_dim)
        self.img_in = nn.Linear(self.in_channels, hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size)
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels)

    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None):
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_embed:
            if guidance is None:
                raise ValueError("Didn't get guidance strength for guidance distilled model.")
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        img = torch.cat((txt, img), 1)
        for block in self.single_blocks:
            img = block(img, vec=vec, pe=pe)
        return self.final_layer(img[:, txt.shape[1] :, ...], vec)

    def forward(self, x, timestep, context, y, guidance=None, **kwargs):
        img, img_ids, txt_ids, (h, w) = patches_and_ids(x, context)
        return image_from_patches(self.inner_forward(img, img_ids, context, txt_ids, timestep, y, guidance), h, w)


def patches_and_ids(x, context):
    """Forge's forward before ``inner_forward``: circular pad to even sizes, 2×2 patches, image ids
    (0, row, column) and zero text ids, in x's dtype."""
    bs, _, h, w = x.shape
    x = nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="circular")
    img = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
    h_len, w_len = (h + 1) // 2, (w + 1) // 2
    img_ids = torch.zeros((h_len, w_len, 3), device=x.device, dtype=x.dtype)
    img_ids[..., 1] = img_ids[..., 1] + torch.linspace(0, h_len - 1, steps=h_len, device=x.device, dtype=x.dtype)[:, None]
    img_ids[..., 2] = img_ids[..., 2] + torch.linspace(0, w_len - 1, steps=w_len, device=x.device, dtype=x.dtype)[None, :]
    img_ids = repeat(img_ids, "h w c -> b (h w) c", b=bs)
    txt_ids = torch.zeros((bs, context.shape[1], 3), device=x.device, dtype=x.dtype)
    return img, img_ids, txt_ids, (h, w)


def image_from_patches(out, h, w):
    """Forge's forward after ``inner_forward``: patches back to ``[B, C, h, w]``, padding cut."""
    return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=(h + 1) // 2, w=(w + 1) // 2, ph=2, pw=2)[:, :, :h, :w]
