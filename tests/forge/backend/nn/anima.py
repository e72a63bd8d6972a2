"""Mirrors backend/nn/anima.py of Forge Neo (read in the copy exo101/sd-webui-forge-neo-v3 @
5692d2d1e6c293faf5486f7cb18c27c9a3faa758, ``webui/backend/nn/anima.py``; Neo's port of ComfyUI's
comfy/ldm/cosmos/predict2.py), the diffusion model: a Cosmos-Predict2 DiT with separate self- and
cross-attention, the same class, attribute and argument names and order of operations, written from
its behaviour. Sizes are constructor arguments.

Mirrored: ``SelfCrossAttention`` (``q_proj``/``k_proj``/``v_proj`` without bias, heads split as
``(h d)``, per-head ``q_norm``/``k_norm`` RMSNorm, ``v_norm`` Identity, RoPE on self-attention only,
``attention_function(..., skip_reshape=True, transformer_options=...)`` on ``[B, H, S, D]``, then
``output_proj`` and ``output_dropout``; ``transformer_options`` a keyword of every attention call);
``Block`` (AdaLN-LoRA modulations for self-attention, cross-attention and MLP; tokens flattened to
``b (t h w) d`` for each attention; ``addcmul`` residuals with gates; the same ``crossattn_emb`` for
every block); ``Anima.forward(x, timesteps, context, padding_mask=None, **kwargs)`` (reference latents
from ``dynamic_args.ref_latents`` on the time axis, doubled only for a 2-row batch; padding to the
patch size; the zero padding-mask channel; timestep embedding and its RMSNorm; fp32 residual stream
for fp16; ``FinalLayer``; unpatchify, cropped). ``VideoRopePosition3DEmb`` as Neo's (fp16 frequency
exponents); ``apply_rope_split_half`` stands in for ComfyUI-kitchen's (not read): rotation of the two
halves of each head.

Left out: the text encoder's LLM adapter (Neo moves it to the text encoder at load; the model gets its
output as ``context``), a given ``padding_mask`` (resized by torchvision in Neo; Neo's engine passes none).
"""

import math

import torch
from einops import rearrange, repeat
from einops.layers.torch import Rearrange
from torch import nn

from backend.args import dynamic_args
from backend.attention import attention_function
from backend.utils import pad_to_patch_size


def apply_rope_split_half(q, k, rope_emb):
    """q, k ``[B, S, H, D]`` rotated by ``rope_emb`` ``[1, S, 1, D/2, 2, 2]``: pairs (first half, second half)."""

    def rotate(x):
        first, second = x.float().chunk(2, dim=-1)
        out = torch.cat(
            [rope_emb[..., 0, 0] * first + rope_emb[..., 0, 1] * second, rope_emb[..., 1, 0] * first + rope_emb[..., 1, 1] * second], dim=-1
        )
        return out.type_as(x)

    return rotate(q), rotate(k)


class VideoRopePosition3DEmb(nn.Module):
    def __init__(self, head_dim, h_extrapolation_ratio, w_extrapolation_ratio, t_extrapolation_ratio):
        super().__init__()
        dim_h = head_dim // 6 * 2
        dim_w = dim_h
        dim_t = head_dim - 2 * dim_h
        self.register_buffer("dim_spatial_range", torch.arange(0, dim_h, 2)[: (dim_h // 2)].float() / dim_h, persistent=False)
        self.register_buffer("dim_temporal_range", torch.arange(0, dim_t, 2)[: (dim_t // 2)].float() / dim_t, persistent=False)
        self.h_ntk_factor = h_extrapolation_ratio ** (dim_h / (dim_h - 2))
        self.w_ntk_factor = w_extrapolation_ratio ** (dim_w / (dim_w - 2))
        self.t_ntk_factor = t_extrapolation_ratio ** (dim_t / (dim_t - 2))

    def forward(self, x_B_T_H_W_C, device):
        _b, T, H, W, _ = x_B_T_H_W_C.shape

        def rotations(theta, frequencies, length):
            freqs = 1.0 / (theta ** frequencies.to(dtype=torch.float16, device=device))
            angles = torch.outer(torch.arange(max(H, W, T), dtype=torch.float, device=device)[:length], freqs)
            return torch.stack([torch.cos(angles), -torch.sin(angles), torch.sin(angles), torch.cos(angles)], dim=-1)

        half_emb_h = rotations(10000.0 * self.h_ntk_factor, self.dim_spatial_range, H)
        half_emb_w = rotations(10000.0 * self.w_ntk_factor, self.dim_spatial_range, W)
        half_emb_t = rotations(10000.0 * self.t_ntk_factor, self.dim_temporal_range, T)
        em_T_H_W_D = torch.cat(
            [
                repeat(half_emb_t, "t d x -> t h w d x", h=H, w=W),
                repeat(half_emb_h, "h d x -> t h w d x", t=T, w=W),
                repeat(half_emb_w, "w d x -> t h w d x", t=T, h=H),
            ],
            dim=-2,
        )
        return rearrange(em_T_H_W_D, "t h w d (i j) -> (t h w) d i j", i=2, j=2).float()


class GPT2FeedForward(nn.Module):
    def __init__(self, d_model, d_ff):
        super().__init__()
        self.activation = nn.GELU()
        self.layer1 = nn.Linear(d_model, d_ff, bias=False)
        self.layer2 = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x):
        return self.layer2(self.activation(self.layer1(x)))


class SelfCrossAttention(nn.Module):
    def __init__(self, query_dim, context_dim=None, n_heads=8, head_dim=64, dropout=0.0):
        super().__init__()
        self.is_SelfAttn = context_dim is None
        inner_dim = head_dim * n_heads
        self.n_heads = n_heads
        self.head_dim = head_dim
        self.context_dim = context_dim or query_dim
        self.q_proj = nn.Linear(query_dim, inner_dim, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.k_proj = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.k_norm = nn.RMSNorm(self.head_dim, eps=1e-6)
        self.v_proj = nn.Linear(self.context_dim, inner_dim, bias=False)
        self.v_norm = nn.Identity()
        self.output_proj = nn.Linear(inner_dim, query_dim, bias=False)
        self.output_dropout = nn.Dropout(dropout) if dropout > 1e-4 else nn.Identity()

    def compute_qkv(self, x, context=None, rope_emb=None):
        q = self.q_proj(x)
        k = self.k_proj(x if context is None else context)
        v = self.v_proj(x if context is None else context)
        q, k, v = (rearrange(t, "b ... (h d) -> b ... h d", h=self.n_heads, d=self.head_dim) for t in (q, k, v))
        q, k, v = self.q_norm(q), self.k_norm(k), self.v_norm(v)
        if self.is_SelfAttn and rope_emb is not None:
            q, k = apply_rope_split_half(q, k, rope_emb)
        return q, k, v

    @staticmethod
    def torch_attention_op(q_B_S_H_D, k_B_S_H_D, v_B_S_H_D, transformer_options={}):  # noqa: B006
        q_shape, k_shape = q_B_S_H_D.shape, k_B_S_H_D.shape
        q = rearrange(q_B_S_H_D, "b ... h k -> b h ... k").view(q_shape[0], q_shape[-2], -1, q_shape[-1])
        k = rearrange(k_B_S_H_D, "b ... h v -> b h ... v").view(k_shape[0], k_shape[-2], -1, k_shape[-1])
        v = rearrange(v_B_S_H_D, "b ... h v -> b h ... v").view(k_shape[0], k_shape[-2], -1, k_shape[-1])
        return attention_function(q, k, v, q_shape[-2], skip_reshape=True, transformer_options=transformer_options)

    def compute_attention(self, q, k, v, transformer_options={}):  # noqa: B006
        return self.output_dropout(self.output_proj(self.torch_attention_op(q, k, v, transformer_options=transformer_options)))

    def forward(self, x, context=None, rope_emb=None, transformer_options={}):  # noqa: B006
        q, k, v = self.compute_qkv(x, context, rope_emb=rope_emb)
        return self.compute_attention(q, k, v, transformer_options=transformer_options)


class Timesteps(nn.Module):
    def __init__(self, num_channels):
        super().__init__()
        self.num_channels = num_channels

    def forward(self, timesteps_B_T):
        timesteps = timesteps_B_T.flatten().float()
        half_dim = self.num_channels // 2
        exponent = -math.log(10000) * torch.arange(half_dim, dtype=torch.float32, device=timesteps.device) / half_dim
        emb = timesteps[:, None] * torch.exp(exponent)[None, :]
        emb = torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)
        return rearrange(emb, "(b t) d -> b t d", b=timesteps_B_T.shape[0], t=timesteps_B_T.shape[1])


class TimestepEmbedding(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.in_dim = in_features
        self.out_dim = out_features
        self.linear_1 = nn.Linear(in_features, out_features, bias=False)
        self.activation = nn.SiLU()
        self.linear_2 = nn.Linear(out_features, 3 * out_features, bias=False)

    def forward(self, sample):
        return sample, self.linear_2(self.activation(self.linear_1(sample)))


class PatchEmbed(nn.Module):
    def __init__(self, spatial_patch_size, temporal_patch_size, in_channels=3, out_channels=768):
        super().__init__()
        self.spatial_patch_size = spatial_patch_size
        self.temporal_patch_size = temporal_patch_size
        patch = {"r": temporal_patch_size, "m": spatial_patch_size, "n": spatial_patch_size}
        self.proj = nn.Sequential(
            Rearrange("b c (t r) (h m) (w n) -> b t h w (c r m n)", **patch),
            nn.Linear(in_channels * spatial_patch_size * spatial_patch_size * temporal_patch_size, out_channels, bias=False),
        )

    def forward(self, x):
        return self.proj(x)


def modulated(x, norm, scale, shift):
    """``norm(x)·(1 + scale) + shift`` (Neo's ``_fn``)."""
    return norm(x) * (1 + scale) + shift


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, spatial_patch_size, temporal_patch_size, out_channels, adaln_lora_dim=256):
        super().__init__()
        self.layer_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, spatial_patch_size * spatial_patch_size * temporal_patch_size * out_channels, bias=False)
        self.hidden_size = hidden_size
        self.n_adaln_chunks = 2
        self.adaln_lora_dim = adaln_lora_dim
        self.adaln_modulation = nn.Sequential(
            nn.SiLU(),
            nn.Linear(hidden_size, adaln_lora_dim, bias=False),
            nn.Linear(adaln_lora_dim, self.n_adaln_chunks * hidden_size, bias=False),
        )

    def forward(self, x_B_T_H_W_D, emb_B_T_D, adaln_lora_B_T_3D=None):
        shift, scale = (self.adaln_modulation(emb_B_T_D) + adaln_lora_B_T_3D[:, :, : 2 * self.hidden_size]).chunk(2, dim=-1)
        x = modulated(x_B_T_H_W_D, self.layer_norm, rearrange(scale, "b t d -> b t 1 1 d"), rearrange(shift, "b t d -> b t 1 1 d"))
        return self.linear(x)


def adaln(x_dim, adaln_lora_dim):
    return nn.Sequential(nn.SiLU(), nn.Linear(x_dim, adaln_lora_dim, bias=False), nn.Linear(adaln_lora_dim, 3 * x_dim, bias=False))


class Block(nn.Module):
    def __init__(self, x_dim, context_dim, num_heads, mlp_ratio=4.0, adaln_lora_dim=256):
        super().__init__()
        self.x_dim = x_dim
        self.layer_norm_self_attn = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.self_attn = SelfCrossAttention(x_dim, None, num_heads, x_dim // num_heads)
        self.layer_norm_cross_attn = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.cross_attn = SelfCrossAttention(x_dim, context_dim, num_heads, x_dim // num_heads)
        self.layer_norm_mlp = nn.LayerNorm(x_dim, elementwise_affine=False, eps=1e-6)
        self.mlp = GPT2FeedForward(x_dim, int(x_dim * mlp_ratio))
        self.adaln_modulation_self_attn = adaln(x_dim, adaln_lora_dim)
        self.adaln_modulation_cross_attn = adaln(x_dim, adaln_lora_dim)
        self.adaln_modulation_mlp = adaln(x_dim, adaln_lora_dim)

    def forward(
        self,
        x_B_T_H_W_D,
        emb_B_T_D,
        crossattn_emb,
        rope_emb_L_1_1_D=None,
        adaln_lora_B_T_3D=None,
        extra_per_block_pos_emb=None,
        transformer_options={},  # noqa: B006 (Neo's signature)
    ):
        residual_dtype, compute_dtype = x_B_T_H_W_D.dtype, emb_B_T_D.dtype
        if extra_per_block_pos_emb is not None:
            x_B_T_H_W_D = x_B_T_H_W_D + extra_per_block_pos_emb

        def modulation(layers):
            return [rearrange(t, "b t d -> b t 1 1 d") for t in (layers(emb_B_T_D) + adaln_lora_B_T_3D).chunk(3, dim=-1)]

        shift_self, scale_self, gate_self = modulation(self.adaln_modulation_self_attn)
        shift_cross, scale_cross, gate_cross = modulation(self.adaln_modulation_cross_attn)
        shift_mlp, scale_mlp, gate_mlp = modulation(self.adaln_modulation_mlp)
        _b, T, H, W, _d = x_B_T_H_W_D.shape

        def attend(attn, normalized, context):
            tokens = rearrange(normalized.to(compute_dtype), "b t h w d -> b (t h w) d")
            out = attn(tokens, context, rope_emb=rope_emb_L_1_1_D, transformer_options=transformer_options)
            return rearrange(out, "b (t h w) d -> b t h w d", t=T, h=H, w=W)

        result = attend(self.self_attn, modulated(x_B_T_H_W_D, self.layer_norm_self_attn, scale_self, shift_self), None)
        x_B_T_H_W_D = torch.addcmul(x_B_T_H_W_D, gate_self.to(residual_dtype), result.to(residual_dtype))
        result = attend(self.cross_attn, modulated(x_B_T_H_W_D, self.layer_norm_cross_attn, scale_cross, shift_cross), crossattn_emb)
        x_B_T_H_W_D = torch.addcmul(x_B_T_H_W_D, gate_cross.to(residual_dtype), result.to(residual_dtype))
        result = self.mlp(modulated(x_B_T_H_W_D, self.layer_norm_mlp, scale_mlp, shift_mlp).to(compute_dtype))
        return torch.addcmul(x_B_T_H_W_D, gate_mlp.to(residual_dtype), result.to(residual_dtype))


class Anima(nn.Module):
    def __init__(
        self,
        in_channels,
        out_channels,
        patch_spatial,
        patch_temporal,
        model_channels=768,
        concat_padding_mask=True,
        crossattn_emb_channels=1024,
        adaln_lora_dim=256,
        num_blocks=10,
        num_heads=16,
        rope_h_extrapolation_ratio=1.0,
        rope_w_extrapolation_ratio=1.0,
        rope_t_extrapolation_ratio=1.0,
        mlp_ratio=4.0,
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.patch_spatial = patch_spatial
        self.patch_temporal = patch_temporal
        self.pos_embedder = VideoRopePosition3DEmb(
            model_channels // num_heads, rope_h_extrapolation_ratio, rope_w_extrapolation_ratio, rope_t_extrapolation_ratio
        )
        self.t_embedder = nn.Sequential(Timesteps(model_channels), TimestepEmbedding(model_channels, model_channels))
        in_channels = in_channels + 1 if concat_padding_mask else in_channels
        self.x_embedder = PatchEmbed(patch_spatial, patch_temporal, in_channels=in_channels, out_channels=model_channels)
        self.blocks = nn.ModuleList(
            [Block(model_channels, crossattn_emb_channels, num_heads, mlp_ratio, adaln_lora_dim) for _ in range(num_blocks)]
        )
        self.final_layer = FinalLayer(model_channels, patch_spatial, patch_temporal, out_channels, adaln_lora_dim)
        self.t_embedding_norm = nn.RMSNorm(model_channels, eps=1e-6)

    def prepare_embedded_sequence(self, x_B_C_T_H_W, padding_mask=None):
        b, _c, t, h, w = x_B_C_T_H_W.shape
        padding_mask = torch.zeros(b, 1, h, w, dtype=x_B_C_T_H_W.dtype, device=x_B_C_T_H_W.device)
        x_B_C_T_H_W = torch.cat([x_B_C_T_H_W, padding_mask.unsqueeze(1).repeat(1, 1, t, 1, 1)], dim=1)
        x_B_T_H_W_D = self.x_embedder(x_B_C_T_H_W)
        return x_B_T_H_W_D, self.pos_embedder(x_B_T_H_W_D, device=x_B_C_T_H_W.device), None

    def unpatchify(self, x_B_T_H_W_M):
        p, t = self.patch_spatial, self.patch_temporal
        return rearrange(x_B_T_H_W_M, "B T H W (p1 p2 t C) -> B C (T t) (H p1) (W p2)", p1=p, p2=p, t=t)

    def forward(self, x, timesteps, context, padding_mask=None, **kwargs):
        orig_shape = list(x.shape)
        for ref in dynamic_args.ref_latents:
            if x.shape[0] == 2:  # batch_cond_uncond
                ref = torch.cat((ref, ref), dim=0)
            x = torch.cat((x, ref.to(x)), dim=2)
        x = pad_to_patch_size(x, (self.patch_temporal, self.patch_spatial, self.patch_spatial))
        x_B_T_H_W_D, rope_emb_L_1_1_D, extra_pos_emb = self.prepare_embedded_sequence(x, padding_mask=padding_mask)
        timesteps_B_T = timesteps.unsqueeze(1) if timesteps.ndim == 1 else timesteps
        t_embedding_B_T_D, adaln_lora_B_T_3D = self.t_embedder[1](self.t_embedder[0](timesteps_B_T).to(x_B_T_H_W_D.dtype))
        t_embedding_B_T_D = self.t_embedding_norm(t_embedding_B_T_D)
        block_kwargs = {
            "rope_emb_L_1_1_D": rope_emb_L_1_1_D.unsqueeze(1).unsqueeze(0),
            "adaln_lora_B_T_3D": adaln_lora_B_T_3D,
            "extra_per_block_pos_emb": extra_pos_emb,
            "transformer_options": kwargs.get("transformer_options", {}),
        }
        if x_B_T_H_W_D.dtype is torch.float16:  # the residual stream in fp32, attention and MLP in fp16
            x_B_T_H_W_D = x_B_T_H_W_D.float()
        for block in self.blocks:
            x_B_T_H_W_D = block(x_B_T_H_W_D, t_embedding_B_T_D, context, **block_kwargs)
        out = self.final_layer(x_B_T_H_W_D.to(context.dtype), t_embedding_B_T_D, adaln_lora_B_T_3D=adaln_lora_B_T_3D)
        return self.unpatchify(out)[:, :, : orig_shape[-3], : orig_shape[-2], : orig_shape[-1]]
