"""Mirrors backend/nn/lumina.py of Forge Neo (its port of ComfyUI v0.3.77 comfy/ldm/lumina/model.py):
``NextDiT``, the network of Lumina 2 (Neta Lumina) and Z-Image. Read in a copy of Neo v3.5,
exo101/sd-webui-forge-neo-v3 @ 5692d2d1e6c293faf5486f7cb18c27c9a3faa758 (``webui/backend/nn/lumina.py``,
added in f95f632a); the same class, attribute and argument names and order of operations, written from
its behaviour, with the sizes as constructor arguments.

Mirrored: ``modulate`` (scale only), ``timestep_embedding`` ([cos, sin]), ``TimestepEmbedder``;
``JointAttention`` (one ``qkv`` projection split into q, k, v with ``n_kv_heads`` key/value heads,
qk-norm, ``apply_rope`` on ``[B, L, H, Dh]``, k/v repeated per query head on a new axis, then
``attention_function(..., skip_reshape=True, transformer_options=...)`` and ``out``); ``FeedForward``
(SwiGLU, ``clamp_fp16`` of the gated product); ``JointTransformerBlock`` with and without modulation
(Lumina 2's ``SiLU`` + ``Linear`` adaLN, Z-Image's ``Linear`` alone; sandwich norms, ``tanh`` gates,
``clamp_fp16`` of both branch outputs when modulated, of the attention branch only when not);
``FinalLayer``; ``NextDiT.patchify_and_embed`` (Z-Image's caption and image pad tokens, caption positions
``1..L`` on axis 0, the image at ``L + 1`` with row and column, image pad tokens at 0, the caption through
``context_refiner`` and the image through ``noise_refiner``, ``[caption; image]``), ``unpatchify`` and
``forward`` (``1 - timesteps``, ``time_scale``, ``cap_embedder``, the layers, the final layer, ``-x``).

Left out: ``timestep_embedding``'s ``repeat_only`` and odd widths, the pooled-text path
(``clip_text_dim``; Neo's detector never sets it) and list inputs. ``num_tokens`` is taken and unused,
as there. The rotary embedding (``EmbedND``) and ``apply_rope`` are the Flux stand-in's (Neo imports
both from its ``flux.py``; its ``apply_rope`` is comfy_kitchen's, the same rotation)."""

import math

import torch
import torch.nn.functional as F
from torch import nn

from backend.attention import attention_function
from backend.nn.flux import EmbedND, apply_rope
from backend.utils import fp16_fix as clamp_fp16
from backend.utils import pad_to_patch_size


def modulate(x, scale):
    return x * (1 + scale.unsqueeze(1))


def timestep_embedding(timesteps, dim, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TimestepEmbedder(nn.Module):
    def __init__(self, hidden_size, frequency_embedding_size=256, output_size=None):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, output_size or hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size

    def forward(self, t, dtype, **kwargs):
        return self.mlp(timestep_embedding(t, self.frequency_embedding_size).to(dtype))


class JointAttention(nn.Module):
    def __init__(self, dim, n_heads, n_kv_heads, qk_norm, out_bias=False):
        super().__init__()
        self.n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        self.n_local_heads = n_heads
        self.n_local_kv_heads = self.n_kv_heads
        self.n_rep = self.n_local_heads // self.n_local_kv_heads
        self.head_dim = dim // n_heads
        self.qkv = nn.Linear(dim, (n_heads + 2 * self.n_kv_heads) * self.head_dim, bias=False)
        self.out = nn.Linear(n_heads * self.head_dim, dim, bias=out_bias)
        if qk_norm:
            self.q_norm = nn.RMSNorm(self.head_dim, elementwise_affine=True)
            self.k_norm = nn.RMSNorm(self.head_dim, elementwise_affine=True)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(self, x, x_mask, freqs_cis, transformer_options={}):  # noqa: B006 (Neo's signature)
        bsz, seqlen, _ = x.shape
        kv_width = self.n_local_kv_heads * self.head_dim
        xq, xk, xv = torch.split(self.qkv(x), [self.n_local_heads * self.head_dim, kv_width, kv_width], dim=-1)
        xq = self.q_norm(xq.view(bsz, seqlen, self.n_local_heads, self.head_dim))
        xk = self.k_norm(xk.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim))
        xv = xv.view(bsz, seqlen, self.n_local_kv_heads, self.head_dim)
        xq, xk = apply_rope(xq, xk, freqs_cis)
        n_rep = self.n_local_heads // self.n_local_kv_heads
        if n_rep >= 1:  # always: Neo repeats even one copy
            xk = xk.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            xv = xv.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
        output = attention_function(
            xq.movedim(1, 2), xk.movedim(1, 2), xv.movedim(1, 2), self.n_local_heads, x_mask, skip_reshape=True,
            transformer_options=transformer_options,
        )  # fmt: skip
        return self.out(output)


class FeedForward(nn.Module):
    def __init__(self, dim, hidden_dim, multiple_of, ffn_dim_multiplier):
        super().__init__()
        if ffn_dim_multiplier is not None:
            hidden_dim = int(ffn_dim_multiplier * hidden_dim)
        hidden_dim = multiple_of * ((hidden_dim + multiple_of - 1) // multiple_of)
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def _forward_silu_gating(self, x1, x3):
        return clamp_fp16(F.silu(x1) * x3)

    def forward(self, x):
        return self.w2(self._forward_silu_gating(self.w1(x), self.w3(x)))


class JointTransformerBlock(nn.Module):
    def __init__(
        self, layer_id, dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm, modulation=True,
        z_image_modulation=False, attn_out_bias=False,
    ):  # fmt: skip
        super().__init__()
        self.dim = dim
        self.head_dim = dim // n_heads
        self.attention = JointAttention(dim, n_heads, n_kv_heads, qk_norm, out_bias=attn_out_bias)
        self.feed_forward = FeedForward(dim=dim, hidden_dim=dim, multiple_of=multiple_of, ffn_dim_multiplier=ffn_dim_multiplier)
        self.layer_id = layer_id
        self.attention_norm1 = nn.RMSNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.ffn_norm1 = nn.RMSNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.attention_norm2 = nn.RMSNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.ffn_norm2 = nn.RMSNorm(dim, eps=norm_eps, elementwise_affine=True)
        self.modulation = modulation
        if modulation:
            if z_image_modulation:
                self.adaLN_modulation = nn.Sequential(nn.Linear(min(dim, 256), 4 * dim, bias=True))
            else:
                self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(dim, 1024), 4 * dim, bias=True))

    def forward(self, x, x_mask, freqs_cis, adaln_input=None, transformer_options={}):  # noqa: B006
        if self.modulation:
            assert adaln_input is not None
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(adaln_input).chunk(4, dim=1)
            attended = self.attention(
                modulate(self.attention_norm1(x), scale_msa), x_mask, freqs_cis, transformer_options=transformer_options
            )
            x = x + gate_msa.unsqueeze(1).tanh() * self.attention_norm2(clamp_fp16(attended))
            fed = self.feed_forward(modulate(self.ffn_norm1(x), scale_mlp))
            return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(clamp_fp16(fed))
        assert adaln_input is None
        attended = self.attention(self.attention_norm1(x), x_mask, freqs_cis, transformer_options=transformer_options)
        x = x + self.attention_norm2(clamp_fp16(attended))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels, z_image_modulation=False):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        min_mod = 256 if z_image_modulation else 1024
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(min(hidden_size, min_mod), hidden_size, bias=True))

    def forward(self, x, c):
        return self.linear(modulate(self.norm_final(x), self.adaLN_modulation(c)))


class NextDiT(nn.Module):
    def __init__(
        self, patch_size=2, in_channels=4, dim=4096, n_layers=32, n_refiner_layers=2, n_heads=32, n_kv_heads=None, multiple_of=256,
        ffn_dim_multiplier=4.0, norm_eps=1e-5, qk_norm=False, cap_feat_dim=5120, axes_dims=(16, 56, 56), axes_lens=(1, 512, 512),
        rope_theta=10000.0, z_image_modulation=False, time_scale=1.0, pad_tokens_multiple=None, clip_text_dim=None,
    ):  # fmt: skip
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.time_scale = time_scale
        self.pad_tokens_multiple = pad_tokens_multiple
        self.x_embedder = nn.Linear(patch_size * patch_size * in_channels, dim, bias=True)
        block = (dim, n_heads, n_kv_heads, multiple_of, ffn_dim_multiplier, norm_eps, qk_norm)
        self.noise_refiner = nn.ModuleList(
            JointTransformerBlock(i, *block, modulation=True, z_image_modulation=z_image_modulation) for i in range(n_refiner_layers)
        )
        self.context_refiner = nn.ModuleList(JointTransformerBlock(i, *block, modulation=False) for i in range(n_refiner_layers))
        self.t_embedder = TimestepEmbedder(min(dim, 1024), output_size=256 if z_image_modulation else None)
        self.cap_embedder = nn.Sequential(
            nn.RMSNorm(cap_feat_dim, eps=norm_eps, elementwise_affine=True), nn.Linear(cap_feat_dim, dim, bias=True)
        )
        self.clip_text_pooled_proj = None  # the pooled-text path (clip_text_dim) is left out
        self.layers = nn.ModuleList(
            JointTransformerBlock(i, *block, z_image_modulation=z_image_modulation, attn_out_bias=False) for i in range(n_layers)
        )
        self.final_layer = FinalLayer(dim, patch_size, self.out_channels, z_image_modulation=z_image_modulation)
        if self.pad_tokens_multiple is not None:
            self.x_pad_token = nn.Parameter(torch.empty((1, dim)))
            self.cap_pad_token = nn.Parameter(torch.empty((1, dim)))
        assert dim // n_heads == sum(axes_dims)
        self.axes_dims = axes_dims
        self.axes_lens = axes_lens
        self.rope_embedder = EmbedND(dim=dim // n_heads, theta=rope_theta, axes_dim=axes_dims)
        self.dim = dim
        self.n_heads = n_heads

    def unpatchify(self, x, img_size, cap_size, return_tensor=False):
        p = self.patch_size
        images = []
        for i in range(x.size(0)):
            height, width = img_size[i]
            begin = cap_size[i]
            patches = x[i][begin : begin + (height // p) * (width // p)]
            image = patches.view(height // p, width // p, p, p, self.out_channels).permute(4, 0, 2, 1, 3).flatten(3, 4).flatten(1, 2)
            images.append(image)
        return torch.stack(images, dim=0) if return_tensor else images

    def patchify_and_embed(self, x, cap_feats, cap_mask, t, num_tokens, transformer_options={}):  # noqa: B006
        bsz, p = len(x), self.patch_size
        device, dtype = x[0].device, x[0].dtype
        if self.pad_tokens_multiple is not None:
            pad_extra = (-cap_feats.shape[1]) % self.pad_tokens_multiple
            pads = (
                self.cap_pad_token.to(device=cap_feats.device, dtype=cap_feats.dtype, copy=True)
                .unsqueeze(0)
                .repeat(cap_feats.shape[0], pad_extra, 1)
            )
            cap_feats = torch.cat((cap_feats, pads), dim=1)
        cap_pos_ids = torch.zeros(bsz, cap_feats.shape[1], 3, dtype=torch.float32, device=device)
        cap_pos_ids[:, :, 0] = torch.arange(cap_feats.shape[1], dtype=torch.float32, device=device) + 1.0

        B, C, H, W = x.shape
        x = self.x_embedder(x.view(B, C, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1).flatten(3).flatten(1, 2))
        rows, columns = H // p, W // p
        x_pos_ids = torch.zeros((bsz, x.shape[1], 3), dtype=torch.float32, device=device)
        x_pos_ids[:, :, 0] = cap_feats.shape[1] + 1
        x_pos_ids[:, :, 1] = torch.arange(rows, dtype=torch.float32, device=device).view(-1, 1).repeat(1, columns).flatten()
        x_pos_ids[:, :, 2] = torch.arange(columns, dtype=torch.float32, device=device).view(1, -1).repeat(rows, 1).flatten()
        if self.pad_tokens_multiple is not None:
            pad_extra = (-x.shape[1]) % self.pad_tokens_multiple
            x = torch.cat(
                (x, self.x_pad_token.to(device=x.device, dtype=dtype, copy=True).unsqueeze(0).repeat(x.shape[0], pad_extra, 1)), dim=1
            )
            x_pos_ids = torch.nn.functional.pad(x_pos_ids, (0, 0, 0, pad_extra))

        freqs_cis = self.rope_embedder(torch.cat((cap_pos_ids, x_pos_ids), dim=1)).movedim(1, 2).to(dtype)
        for layer in self.context_refiner:
            cap_feats = layer(cap_feats, cap_mask, freqs_cis[:, : cap_pos_ids.shape[1]], transformer_options=transformer_options)
        for layer in self.noise_refiner:
            x = layer(x, None, freqs_cis[:, cap_pos_ids.shape[1] :], t, transformer_options=transformer_options)
        return torch.cat((cap_feats, x), dim=1), None, [(H, W)] * bsz, [cap_feats.shape[1]] * bsz, freqs_cis

    def forward(self, x, timesteps, context, num_tokens=None, attention_mask=None, transformer_options={}, **kwargs):  # noqa: B006
        t = 1.0 - timesteps
        _, _, h, w = x.shape
        x = pad_to_patch_size(x, (self.patch_size, self.patch_size))
        t = self.t_embedder(t * self.time_scale, dtype=x.dtype)
        adaln_input = t
        cap_feats = self.cap_embedder(context)
        x, mask, img_size, cap_size, freqs_cis = self.patchify_and_embed(
            x, cap_feats, attention_mask, t, num_tokens, transformer_options=transformer_options
        )
        freqs_cis = freqs_cis.to(x.device)
        for layer in self.layers:
            x = layer(x, mask, freqs_cis, adaln_input, transformer_options=transformer_options)
        x = self.final_layer(x, adaln_input)
        x = self.unpatchify(x, img_size, cap_size, return_tensor=True)[:, :, :h, :w]
        return -x
