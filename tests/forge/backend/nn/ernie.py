"""Mirrors backend/nn/ernie.py of Forge Neo, read in a copy of Neo v3.5, exo101/sd-webui-forge-neo-v3
@ 5692d2d1e6c293faf5486f7cb18c27c9a3faa758 (``webui/backend/nn/ernie.py``, added in f95f632a; Neo's port
of ComfyUI's ``comfy/ldm/ernie/model.py``): the same class, attribute and argument names and order of
operations, written from its behaviour, with sizes as constructor arguments (Neo's defaults are the
full model's).

Mirrored: the RoPE tables (angles in float64, cast to float32; per head pair a 2×2 matrix whose top row
takes the first half of the frequencies and whose bottom row the second half, for comfy_kitchen's
``apply_rope_split_half``); ``ErnieImageAttention`` (``to_q/to_k/to_v``, per-head RMS ``norm_q/norm_k``,
the RoPE, ``attention_function(q, k, v, heads, mask=...)`` on heads-merged tensors, ``to_out[0]``);
``ErnieImageSharedAdaLNBlock`` (modulation and gate arithmetic in float32, out-of-place residuals);
``ErnieImageModel.forward(x, timesteps, context, **kwargs)``: ``[image; text]`` tokens, text ids
``0 … L−1`` on axis 0, the image at axis 0 = L, ``transformer_options["rope_options"]`` (``scale_y``,
``scale_x``, ``shift_t``, ``shift_y``, ``shift_x``), one modulation from the time embedding shared by
every layer, the final norm on the time embedding, the image tokens kept. Left out: nothing the
forward runs; ``supports_fp64`` is the stand-in's (always True on the CPU)."""

import math

import comfy_kitchen as ck
import torch
import torch.nn.functional as F
from torch import nn

from backend.attention import attention_function
from backend.memory_management import supports_fp64


def rope(pos, dim, theta):
    """``[2, ..., dim/2]``: cos and sin of ``pos · theta^(−2i/dim)``, made in float64, returned in float32."""
    device = pos.device if supports_fp64(pos.device) else torch.device("cpu")
    omega = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=device) / dim)
    angles = pos.to(device).unsqueeze(-1) * omega
    return torch.stack([angles.cos(), angles.sin()]).to(dtype=torch.float32, device=pos.device)


class ErnieImageEmbedND3(nn.Module):
    def __init__(self, dim, theta, axes_dim):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids):
        """``[B, S, 3]`` ids → ``[B, S, 1, dim/2, 2, 2]``: ``[[cos_top, −sin_top], [sin_bottom, cos_bottom]]``,
        each half of the frequencies repeated pairwise."""
        cos, sin = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(3)], dim=-1)
        half = cos.shape[-1] // 2

        def pairwise(t):
            return t.repeat_interleave(2, dim=-1)

        (cos_top, cos_bottom), (sin_top, sin_bottom) = cos.split(half, dim=-1), sin.split(half, dim=-1)
        matrix = torch.stack([pairwise(cos_top), -pairwise(sin_top), pairwise(sin_bottom), pairwise(cos_bottom)], dim=-1)
        return matrix.reshape(*matrix.shape[:-1], 2, 2).unsqueeze(2)


class ErnieImagePatchEmbedDynamic(nn.Module):
    def __init__(self, in_channels, embed_dim, patch_size):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        x = self.proj(x)
        return x.flatten(2).transpose(1, 2).contiguous()


class Timesteps(nn.Module):
    def __init__(self, num_channels, flip_sin_to_cos=False):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos

    def forward(self, timesteps):
        half = self.num_channels // 2
        frequencies = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
        angles = timesteps[:, None].float() * frequencies[None, :]
        parts = (angles.cos(), angles.sin()) if self.flip_sin_to_cos else (angles.sin(), angles.cos())
        return torch.cat(parts, dim=-1)


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, bias=True)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim, bias=True)

    def forward(self, sample):
        return self.linear_2(self.act(self.linear_1(sample)))


class ErnieImageAttention(nn.Module):
    def __init__(self, query_dim, heads, dim_head, eps=1e-6):
        super().__init__()
        self.heads = heads
        self.head_dim = dim_head
        self.inner_dim = heads * dim_head
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=False)
        self.to_k = nn.Linear(query_dim, self.inner_dim, bias=False)
        self.to_v = nn.Linear(query_dim, self.inner_dim, bias=False)
        self.norm_q = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, query_dim, bias=False)])

    def forward(self, x, attention_mask=None, image_rotary_emb=None):
        batch, tokens, _ = x.shape
        q_flat, k_flat, v_flat = self.to_q(x), self.to_k(x), self.to_v(x)
        query = self.norm_q(q_flat.view(batch, tokens, self.heads, self.head_dim))
        key = self.norm_k(k_flat.view(batch, tokens, self.heads, self.head_dim))
        if image_rotary_emb is not None:
            query, key = ck.apply_rope_split_half(query, key, image_rotary_emb)
        out = attention_function(query.reshape(batch, tokens, -1), key.reshape(batch, tokens, -1), v_flat, self.heads, mask=attention_mask)
        return self.to_out[0](out)


class ErnieImageFeedForward(nn.Module):
    def __init__(self, hidden_size, ffn_hidden_size):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, ffn_hidden_size, bias=False)
        self.linear_fc2 = nn.Linear(ffn_hidden_size, hidden_size, bias=False)

    def forward(self, x):
        return self.linear_fc2(self.up_proj(x) * F.gelu(self.gate_proj(x)))


def modulate(normed, scale, shift, dtype):
    """Neo writes this inline twice: ``normed·(1 + scale) + shift`` in float32, back to the stream's dtype."""
    return (normed.float() * (1 + scale.float()) + shift.float()).to(dtype)


class ErnieImageSharedAdaLNBlock(nn.Module):
    def __init__(self, hidden_size, num_heads, ffn_hidden_size, eps=1e-6):
        super().__init__()
        self.adaLN_sa_ln = nn.RMSNorm(hidden_size, eps=eps)
        self.self_attention = ErnieImageAttention(hidden_size, num_heads, hidden_size // num_heads, eps)
        self.adaLN_mlp_ln = nn.RMSNorm(hidden_size, eps=eps)
        self.mlp = ErnieImageFeedForward(hidden_size, ffn_hidden_size)

    def forward(self, x, rotary_pos_emb, temb, attention_mask=None):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = temb
        attn_out = self.self_attention(modulate(self.adaLN_sa_ln(x), scale_msa, shift_msa, x.dtype), attention_mask, rotary_pos_emb)
        x = x + (gate_msa.float() * attn_out.float()).to(x.dtype)
        mlp_out = self.mlp(modulate(self.adaLN_mlp_ln(x), scale_mlp, shift_mlp, x.dtype))
        return x + (gate_mlp.float() * mlp_out.float()).to(x.dtype)


class ErnieImageAdaLNContinuous(nn.Module):
    def __init__(self, hidden_size, eps=1e-6):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=eps)
        self.linear = nn.Linear(hidden_size, hidden_size * 2)

    def forward(self, x, conditioning):
        scale, shift = self.linear(conditioning).chunk(2, dim=-1)  # no SiLU before it
        return self.norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class ErnieImageModel(nn.Module):
    def __init__(
        self,
        hidden_size=4096,
        num_attention_heads=32,
        num_layers=36,
        ffn_hidden_size=12288,
        in_channels=128,
        out_channels=128,
        patch_size=1,
        text_in_dim=3072,
        rope_theta=256,
        rope_axes_dim=(32, 48, 48),
        eps=1e-6,
        *args,
        **kwargs,
    ):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_attention_heads
        self.head_dim = hidden_size // num_attention_heads
        self.patch_size = patch_size
        self.out_channels = out_channels
        self.x_embedder = ErnieImagePatchEmbedDynamic(in_channels, hidden_size, patch_size)
        self.text_proj = nn.Linear(text_in_dim, hidden_size, bias=False) if text_in_dim != hidden_size else None
        self.time_proj = Timesteps(hidden_size, flip_sin_to_cos=False)
        self.time_embedding = TimestepEmbedding(hidden_size, hidden_size)
        self.pos_embed = ErnieImageEmbedND3(self.head_dim, rope_theta, rope_axes_dim)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.layers = nn.ModuleList(
            [ErnieImageSharedAdaLNBlock(hidden_size, num_attention_heads, ffn_hidden_size, eps) for _ in range(num_layers)]
        )
        self.final_norm = ErnieImageAdaLNContinuous(hidden_size, eps)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, x, timesteps, context, **kwargs):
        device, dtype = x.device, x.dtype
        batch, _, height, width = x.shape
        p = self.patch_size
        rows, columns = height // p, width // p
        image_tokens = rows * columns

        img = self.x_embedder(x)
        text = self.text_proj(context) if self.text_proj is not None and context.numel() > 0 else context
        text_tokens = text.shape[1]
        hidden_states = torch.cat([img, text], dim=1)

        text_ids = torch.zeros((batch, text_tokens, 3), device=device, dtype=torch.float32)
        text_ids[:, :, 0] = torch.linspace(0, text_tokens - 1, steps=text_tokens, device=device, dtype=torch.float32)
        index, h_len, w_len, h_offset, w_offset = float(text_tokens), float(rows), float(columns), 0.0, 0.0
        rope_options = kwargs.get("transformer_options", {}).get("rope_options", None)
        if rope_options is not None:
            h_len = (h_len - 1.0) * rope_options.get("scale_y", 1.0) + 1.0
            w_len = (w_len - 1.0) * rope_options.get("scale_x", 1.0) + 1.0
            index += rope_options.get("shift_t", 0.0)
            h_offset += rope_options.get("shift_y", 0.0)
            w_offset += rope_options.get("shift_x", 0.0)
        image_ids = torch.zeros((rows, columns, 3), device=device, dtype=torch.float32)
        image_ids[:, :, 0] = image_ids[:, :, 1] + index
        row_positions = torch.linspace(h_offset, h_len - 1 + h_offset, steps=rows, device=device, dtype=torch.float32)
        column_positions = torch.linspace(w_offset, w_len - 1 + w_offset, steps=columns, device=device, dtype=torch.float32)
        image_ids[:, :, 1] = image_ids[:, :, 1] + row_positions.unsqueeze(1)
        image_ids[:, :, 2] = image_ids[:, :, 2] + column_positions.unsqueeze(0)
        image_ids = image_ids.view(1, image_tokens, 3).expand(batch, -1, -1)
        rotary_pos_emb = self.pos_embed(torch.cat([image_ids, text_ids], dim=1))

        c = self.time_embedding(self.time_proj(timesteps).to(dtype))
        temb = [t.unsqueeze(1).contiguous() for t in self.adaLN_modulation(c).chunk(6, dim=-1)]
        for layer in self.layers:
            hidden_states = layer(hidden_states, rotary_pos_emb, temb)

        hidden_states = self.final_norm(hidden_states, c).type_as(hidden_states)
        patches = self.final_linear(hidden_states)[:, :image_tokens, :]
        output = patches.view(batch, rows, columns, p, p, self.out_channels).permute(0, 5, 1, 3, 2, 4)
        return output.contiguous().view(batch, self.out_channels, height, width)
