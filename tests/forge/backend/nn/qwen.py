"""Mirrors backend/nn/qwen.py of Forge Neo (its port of ComfyUI v0.3.64 comfy/ldm/qwen_image/model.py),
read in a copy of Neo v3.5, exo101/sd-webui-forge-neo-v3 @ 5692d2d1e6c293faf5486f7cb18c27c9a3faa758
(``webui/backend/nn/qwen.py``, added in f95f632a): Qwen-Image and Qwen-Image-Edit's DiT, with the same
class, attribute and argument names and order of operations, written from its behaviour. Sizes are
constructor arguments, so the tests build tiny models.

Mirrored: the timestep projection (``Timesteps``: cos/sin of 1000·σ, cos first) and ``TimestepEmbedding``;
``FeedForward`` (``net``: tanh-GELU ``proj``, dropout, linear); ``apply_rotary_emb`` on ``[B, L, H, D]``;
``Attention`` (image ``to_q/to_k/to_v``, text ``add_q_proj/add_k_proj/add_v_proj``, RMS qk-norms per stream,
``[text; image]`` joint q/k/v rotated together, heads merged into the module-level ``attention_function(q, k,
v, heads, mask)``, ``to_out`` and ``to_add_out``); ``QwenImageTransformerBlock`` (modulation from ``temb``
alone, ``_modulate``, out-of-place residuals, returns ``(text, image)``); ``LastLayer`` (scale before
shift); the model's ``process_img`` (5-D latents, circular pad, 2×2 patches, centred ids, axis 0 the
reference index) and ``forward``: reference latents from the ``ref_latents`` argument or Neo's global
``dynamic_args`` ("index" method by default, "offset" by ``ref_latents_method``; appended after the image
tokens, not expanded to the batch), text ids ``txt_start + j`` on all three axes with ``txt_start`` from the
image size, the rotary embedding cast to x's dtype, ``txt_norm`` then ``txt_in``, the ``dit`` double-block
replace patches, ``patches["double_block"]``, ControlNet input adds (in place, image tokens), the final
layer, the reference tokens cut, unpatched and cropped.

Departures: Neo reads the attribute ``dynamic_args.ref_latents`` of a class that also answers ``get``; the
stand-in's ``dynamic_args`` is a dict, read with ``get``. Left out: ``TimestepEmbedding``'s unused
``cond_proj``/``post_act``, the ``guidance`` branch (it would raise in Neo: Neo never passes guidance),
the ``del``s. ``EmbedND`` is the Forge main stand-in's (Neo's Qwen imports it from its ``flux.py``)."""

import math

import torch
import torch.nn.functional as F
from einops import repeat
from torch import nn

from backend.args import dynamic_args
from backend.attention import attention_function
from backend.nn.flux import EmbedND
from backend.utils import pad_to_patch_size


def get_timestep_embedding(timesteps, embedding_dim, flip_sin_to_cos=False, downscale_freq_shift=1, scale=1, max_period=10000):
    """Sinusoids of ``scale·t`` at ``embedding_dim/2`` frequencies (float32): sin then cos, or cos first when flipped."""
    half = embedding_dim // 2
    frequencies = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / (half - downscale_freq_shift)
    )
    angles = scale * (timesteps[:, None].float() * frequencies[None, :])
    parts = (torch.cos(angles), torch.sin(angles)) if flip_sin_to_cos else (torch.sin(angles), torch.cos(angles))
    embedding = torch.cat(parts, dim=-1)
    return F.pad(embedding, (0, 1, 0, 0)) if embedding_dim % 2 else embedding


class TimestepEmbedding(nn.Module):
    def __init__(self, in_channels, time_embed_dim, sample_proj_bias=True):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim, sample_proj_bias)
        self.act = nn.SiLU()
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim, sample_proj_bias)

    def forward(self, sample):
        return self.linear_2(self.act(self.linear_1(sample)))


class Timesteps(nn.Module):
    def __init__(self, num_channels, flip_sin_to_cos, downscale_freq_shift, scale=1):
        super().__init__()
        self.num_channels = num_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.downscale_freq_shift = downscale_freq_shift
        self.scale = scale

    def forward(self, timesteps):
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos, self.downscale_freq_shift, self.scale)


class GELU(nn.Module):
    def __init__(self, dim_in, dim_out, approximate="none", bias=True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out, bias=bias)
        self.approximate = approximate

    def forward(self, hidden_states):
        return F.gelu(self.proj(hidden_states), approximate=self.approximate)


class FeedForward(nn.Module):
    def __init__(self, dim, dim_out=None, mult=4, dropout=0.0, bias=True):
        super().__init__()
        inner_dim = int(dim * mult)
        self.net = nn.ModuleList(
            [GELU(dim, inner_dim, approximate="tanh", bias=bias), nn.Dropout(dropout), nn.Linear(inner_dim, dim_out or dim, bias=bias)]
        )

    def forward(self, hidden_states, *args, **kwargs):
        for module in self.net:
            hidden_states = module(hidden_states)
        return hidden_states


def apply_rotary_emb(x, freqs_cis):
    """Rotates the pairs ``(2i, 2i+1)`` of ``x [B, L, H, D]`` by ``freqs_cis [B, L, 1, D/2, 2, 2]``."""
    if x.shape[1] == 0:
        return x
    pairs = x.reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]).reshape(*x.shape)


class QwenTimestepProjEmbeddings(nn.Module):
    """``temb`` from the timestep alone (``pooled_projection_dim`` is unused)."""

    def __init__(self, embedding_dim, pooled_projection_dim):
        super().__init__()
        self.time_proj = Timesteps(num_channels=256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)
        self.timestep_embedder = TimestepEmbedding(in_channels=256, time_embed_dim=embedding_dim)

    def forward(self, timestep, hidden_states):
        return self.timestep_embedder(self.time_proj(timestep).to(dtype=hidden_states.dtype))


class Attention(nn.Module):
    def __init__(self, query_dim, dim_head=64, heads=8, dropout=0.0, bias=False, eps=1e-5, out_bias=True, out_dim=None):
        super().__init__()
        self.inner_dim = out_dim if out_dim is not None else dim_head * heads
        self.heads = heads
        self.dim_head = dim_head
        self.norm_q = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.norm_k = nn.RMSNorm(dim_head, eps=eps, elementwise_affine=True)
        self.norm_added_q = nn.RMSNorm(dim_head, eps=eps)
        self.norm_added_k = nn.RMSNorm(dim_head, eps=eps)
        self.to_q, self.to_k, self.to_v = (nn.Linear(query_dim, self.inner_dim, bias=bias) for _ in range(3))
        self.add_q_proj, self.add_k_proj, self.add_v_proj = (nn.Linear(query_dim, self.inner_dim, bias=bias) for _ in range(3))
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, out_dim or query_dim, bias=out_bias), nn.Dropout(dropout)])
        self.to_add_out = nn.Linear(self.inner_dim, query_dim, bias=out_bias)

    def forward(
        self, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None, attention_mask=None, image_rotary_emb=None
    ):
        """``(image output, text output)``; the text mask is not used, as in Neo."""
        seq_txt = encoder_hidden_states.shape[1]
        img_query, img_key, img_value = (p(hidden_states).unflatten(-1, (self.heads, -1)) for p in (self.to_q, self.to_k, self.to_v))
        txt_query, txt_key, txt_value = (
            p(encoder_hidden_states).unflatten(-1, (self.heads, -1)) for p in (self.add_q_proj, self.add_k_proj, self.add_v_proj)
        )
        img_query, img_key = self.norm_q(img_query), self.norm_k(img_key)
        txt_query, txt_key = self.norm_added_q(txt_query), self.norm_added_k(txt_key)
        joint_query = apply_rotary_emb(torch.cat([txt_query, img_query], dim=1), image_rotary_emb).flatten(start_dim=2)
        joint_key = apply_rotary_emb(torch.cat([txt_key, img_key], dim=1), image_rotary_emb).flatten(start_dim=2)
        joint_value = torch.cat([txt_value, img_value], dim=1).flatten(start_dim=2)
        joint_hidden_states = attention_function(joint_query, joint_key, joint_value, self.heads, attention_mask)
        img_attn_output = self.to_out[1](self.to_out[0](joint_hidden_states[:, seq_txt:, :]))
        return img_attn_output, self.to_add_out(joint_hidden_states[:, :seq_txt, :])


class QwenImageTransformerBlock(nn.Module):
    def __init__(self, dim, num_attention_heads, attention_head_dim, eps=1e-6):
        super().__init__()
        self.dim = dim
        self.num_attention_heads = num_attention_heads
        self.attention_head_dim = attention_head_dim
        self.img_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        self.img_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.img_mlp = FeedForward(dim=dim, dim_out=dim)
        self.txt_mod = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim, bias=True))
        self.txt_norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=eps)
        self.txt_mlp = FeedForward(dim=dim, dim_out=dim)
        self.attn = Attention(query_dim=dim, dim_head=attention_head_dim, heads=num_attention_heads, out_dim=dim, bias=True, eps=eps)

    def _modulate(self, x, mod_params):
        """``shift + x·(1 + scale)`` in one ``addcmul``, and the gate, each ``[B, 1, D]``."""
        shift, scale, gate = torch.chunk(mod_params, 3, dim=-1)
        return torch.addcmul(shift.unsqueeze(1), x, 1 + scale.unsqueeze(1)), gate.unsqueeze(1)

    def forward(self, hidden_states, encoder_hidden_states, encoder_hidden_states_mask, temb, image_rotary_emb=None):
        img_mod1, img_mod2 = self.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = self.txt_mod(temb).chunk(2, dim=-1)
        img_modulated, img_gate1 = self._modulate(self.img_norm1(hidden_states), img_mod1)
        txt_modulated, txt_gate1 = self._modulate(self.txt_norm1(encoder_hidden_states), txt_mod1)
        img_attn_output, txt_attn_output = self.attn(
            hidden_states=img_modulated,
            encoder_hidden_states=txt_modulated,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            image_rotary_emb=image_rotary_emb,
        )
        hidden_states = hidden_states + img_gate1 * img_attn_output
        encoder_hidden_states = encoder_hidden_states + txt_gate1 * txt_attn_output
        img_modulated2, img_gate2 = self._modulate(self.img_norm2(hidden_states), img_mod2)
        hidden_states = torch.addcmul(hidden_states, img_gate2, self.img_mlp(img_modulated2))
        txt_modulated2, txt_gate2 = self._modulate(self.txt_norm2(encoder_hidden_states), txt_mod2)
        encoder_hidden_states = torch.addcmul(encoder_hidden_states, txt_gate2, self.txt_mlp(txt_modulated2))
        return encoder_hidden_states, hidden_states


class LastLayer(nn.Module):
    def __init__(self, embedding_dim, conditioning_embedding_dim, elementwise_affine=False, eps=1e-6, bias=True):
        super().__init__()
        self.silu = nn.SiLU()
        self.linear = nn.Linear(conditioning_embedding_dim, embedding_dim * 2, bias=bias)
        self.norm = nn.LayerNorm(embedding_dim, eps, elementwise_affine=False, bias=bias)

    def forward(self, x, conditioning_embedding):
        scale, shift = torch.chunk(self.linear(self.silu(conditioning_embedding)), 2, dim=1)
        return torch.addcmul(shift[:, None, :], self.norm(x), (1 + scale)[:, None, :])


class QwenImageTransformer2DModel(nn.Module):
    def __init__(
        self, patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=3584, pooled_projection_dim=768, guidance_embeds=False, axes_dims_rope=(16, 56, 56), image_model=None,
        final_layer=True,
    ):  # fmt: skip
        super().__init__()
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels or in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.pe_embedder = EmbedND(dim=attention_head_dim, theta=10000, axes_dim=list(axes_dims_rope))
        self.time_text_embed = QwenTimestepProjEmbeddings(embedding_dim=self.inner_dim, pooled_projection_dim=pooled_projection_dim)
        self.txt_norm = nn.RMSNorm(joint_attention_dim, eps=1e-6)
        self.img_in = nn.Linear(in_channels, self.inner_dim)
        self.txt_in = nn.Linear(joint_attention_dim, self.inner_dim)
        self.transformer_blocks = nn.ModuleList(
            [QwenImageTransformerBlock(self.inner_dim, num_attention_heads, attention_head_dim) for _ in range(num_layers)]
        )
        if final_layer:
            self.norm_out = LastLayer(self.inner_dim, self.inner_dim)
            self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels, bias=True)

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        """``[B, C, 1, H, W]`` → patches ``[B, (H/2)(W/2), 4C]`` (channel, row, column order), ids
        ``(index, row − h/2, column − w/2)`` in float32 (offsets in latent pixels), and the padded shape."""
        batch, patch = x.shape[0], self.patch_size
        h, w = x.shape[-2:]
        padded = pad_to_patch_size(x, (1, patch, patch))
        shape = padded.shape
        patches = padded.view(shape[0], shape[1], shape[-2] // 2, 2, shape[-1] // 2, 2).permute(0, 2, 4, 1, 3, 5)
        patches = patches.reshape(shape[0], (shape[-2] // 2) * (shape[-1] // 2), shape[1] * 4)
        h_len, w_len = (h + patch // 2) // patch, (w + patch // 2) // patch
        h_offset, w_offset = (h_offset + patch // 2) // patch, (w_offset + patch // 2) // patch
        img_ids = torch.zeros((h_len, w_len, 3), device=x.device)
        img_ids[:, :, 0] = img_ids[:, :, 1] + index
        rows = torch.linspace(h_offset, h_len - 1 + h_offset, steps=h_len, device=x.device, dtype=x.dtype)
        img_ids[:, :, 1] = img_ids[:, :, 1] + rows.unsqueeze(1) - (h_len // 2)
        columns = torch.linspace(w_offset, w_len - 1 + w_offset, steps=w_len, device=x.device, dtype=x.dtype)
        img_ids[:, :, 2] = img_ids[:, :, 2] + columns.unsqueeze(0) - (w_len // 2)
        return patches, repeat(img_ids, "h w c -> b (h w) c", b=batch), shape

    def forward(
        self, x, timesteps, context, attention_mask=None, guidance=None, ref_latents=None, transformer_options={}, control=None, **kwargs  # noqa: B006
    ):
        encoder_hidden_states_mask = attention_mask
        hidden_states, img_ids, orig_shape = self.process_img(x)
        num_embeds = hidden_states.shape[1]
        ref_latents = ref_latents or dynamic_args.get("ref_latents")
        if ref_latents is not None:
            h = w = index = 0
            by_index = kwargs.get("ref_latents_method", "index") == "index"
            for ref in ref_latents:
                h_offset = w_offset = 0
                if by_index:
                    index += 1
                else:
                    index = 1
                    if ref.shape[-2] + h > ref.shape[-1] + w:
                        w_offset = w
                    else:
                        h_offset = h
                    h, w = max(h, ref.shape[-2] + h_offset), max(w, ref.shape[-1] + w_offset)
                kontext, kontext_ids, _ = self.process_img(ref.to(x), index=index, h_offset=h_offset, w_offset=w_offset)
                hidden_states = torch.cat([hidden_states, kontext], dim=1)
                img_ids = torch.cat([img_ids, kontext_ids], dim=1)
        half = self.patch_size // 2
        txt_start = round(max(((x.shape[-1] + half) // self.patch_size) // 2, ((x.shape[-2] + half) // self.patch_size) // 2))
        txt_ids = torch.arange(txt_start, txt_start + context.shape[1], device=x.device).reshape(1, -1, 1).repeat(x.shape[0], 1, 3)
        image_rotary_emb = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1)).squeeze(1).unsqueeze(2).to(x.dtype)
        hidden_states = self.img_in(hidden_states)
        encoder_hidden_states = self.txt_in(self.txt_norm(context))
        temb = self.time_text_embed(timesteps, hidden_states)
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        patches = transformer_options.get("patches", {})
        for i, block in enumerate(self.transformer_blocks):
            if ("double_block", i) in blocks_replace:

                def block_wrap(args, block=block):
                    txt, img = block(
                        hidden_states=args["img"], encoder_hidden_states=args["txt"], encoder_hidden_states_mask=encoder_hidden_states_mask,
                        temb=args["vec"], image_rotary_emb=args["pe"],
                    )  # fmt: skip
                    return {"txt": txt, "img": img}

                args = {"img": hidden_states, "txt": encoder_hidden_states, "vec": temb, "pe": image_rotary_emb}
                out = blocks_replace[("double_block", i)](args, {"original_block": block_wrap})
                hidden_states, encoder_hidden_states = out["img"], out["txt"]
            else:
                encoder_hidden_states, hidden_states = block(
                    hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states,
                    encoder_hidden_states_mask=encoder_hidden_states_mask, temb=temb, image_rotary_emb=image_rotary_emb,
                )  # fmt: skip
            for patch in patches.get("double_block", []):
                out = patch({"img": hidden_states, "txt": encoder_hidden_states, "x": x, "block_index": i})
                hidden_states, encoder_hidden_states = out["img"], out["txt"]
            if control is not None and i < len(control.get("input")) and control.get("input")[i] is not None:
                add = control.get("input")[i]
                hidden_states[:, : add.shape[1]] += add
        hidden_states = self.proj_out(self.norm_out(hidden_states, temb))
        hidden_states = hidden_states[:, :num_embeds].view(orig_shape[0], orig_shape[-2] // 2, orig_shape[-1] // 2, orig_shape[1], 2, 2)
        return hidden_states.permute(0, 3, 1, 4, 2, 5).reshape(orig_shape)[:, :, :, : x.shape[-2], : x.shape[-1]]
