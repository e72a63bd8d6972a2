"""Mirrors backend/nn/flux.py of Forge Neo (Haoming02/sd-webui-forge-classic, neo, read at
06d6af9a9b98436d013b398ab35f0b0bf8a888ce; Neo's port of ComfyUI v0.9 comfy/ldm/flux), the Flux.1 path
only: the same class and attribute names and order of operations, written from its behaviour.

Left out: the Flux.2 variants (``global_modulation``, ``txt_norm``, ``yak_mlp``, ``mlp_silu_act``,
``txt_ids_dims`` other than empty, ``flipped_img_txt``: their attributes are kept at Flux.1's values
so that NAG can tell the variants apart), the "index" and "uxo" reference methods (Flux.1 Kontext uses
"offset"), ``dit`` block replace patches, ``modulation_dims``, the ``del``s and the mps/xpu ``rope`` branch. Where Neo behaves as
Forge main, the main stand-in's pieces are used (``timestep_embedding``, ``EmbedND``,
``MLPEmbedder``, ``RMSNorm``, ``SelfAttention``, ``split_heads``, ``mlp``)."""

from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import nn

from backend.args import dynamic_args
from backend.attention import attention_function
from backend.nn import flux
from backend.nn.flux import EmbedND, MLPEmbedder, RMSNorm, apply_rope, split_heads, timestep_embedding
from backend.utils import fp16_fix, pad_to_patch_size


def attention(q, k, v, pe, mask=None, transformer_options={}):  # noqa: B006 (Neo's signature)
    """RoPE when ``pe`` is given, then the backend attention on ``[B, H, L, Dh]``, heads merged."""
    if pe is not None:
        q, k = apply_rope(q, k, pe)
    return attention_function(q, k, v, q.shape[1], mask=mask, skip_reshape=True)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """``vec [B, D]`` → ``(ModulationOut, ModulationOut)`` (double) or ``(ModulationOut, None)``, each
    tensor ``[B, 1, D]``."""

    def __init__(self, dim, double):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        out = self.lin(nn.functional.silu(vec)).chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    """Neo's modulation without ``modulation_dims``: ``m_add + tensor·m_mult`` in one ``addcmul``."""
    return tensor * m_mult if m_add is None else torch.addcmul(m_add, tensor, m_mult)


class DoubleStreamBlock(flux.DoubleStreamBlock):
    """Forge main's submodules, with Neo's ``Modulation`` and flags; without modulation layers
    (``modulation=False``, Chroma) ``vec`` is the modulations, ``((img_mod1, img_mod2), (txt_mod1, txt_mod2))``."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False, modulation=True):
        super().__init__(hidden_size, num_heads, mlp_ratio, qkv_bias)
        self.modulation = modulation
        self.flipped_img_txt = False
        del self.img_mod, self.txt_mod  # Forge main's
        if modulation:
            self.img_mod = Modulation(hidden_size, double=True)
            self.txt_mod = Modulation(hidden_size, double=True)

    def stream_qkv(self, attn, normed, mod):
        """Neo writes this inline for each stream: modulation, ``qkv``, heads split."""
        return split_heads(attn.qkv(apply_mod(normed, 1 + mod.scale, mod.shift)), self.num_heads)

    def forward(self, img, txt, vec, pe, attn_mask=None, transformer_options={}):  # noqa: B006
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = (self.img_mod(vec), self.txt_mod(vec)) if self.modulation else vec
        img_q, img_k, img_v = self.stream_qkv(self.img_attn, self.img_norm1(img), img_mod1)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = self.stream_qkv(self.txt_attn, self.txt_norm1(txt), txt_mod1)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)
        q, k, v = (torch.cat(pair, dim=2) for pair in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v)))
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        txt_attn, img_attn = attn[:, : txt.shape[1]], attn[:, txt.shape[1] :]
        # In place, as Neo: the caller's tensors are updated.
        img += apply_mod(self.img_attn.proj(img_attn), img_mod1.gate)
        img += apply_mod(self.img_mlp(apply_mod(self.img_norm2(img), 1 + img_mod2.scale, img_mod2.shift)), img_mod2.gate)
        txt += apply_mod(self.txt_attn.proj(txt_attn), txt_mod1.gate)
        txt += apply_mod(self.txt_mlp(apply_mod(self.txt_norm2(txt), 1 + txt_mod2.scale, txt_mod2.shift)), txt_mod2.gate)
        return img, fp16_fix(txt)


class SingleStreamBlock(nn.Module):
    """Without a modulation layer (``modulation=False``, Chroma) ``vec`` is the ``ModulationOut``."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, modulation=True):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.mlp_hidden_dim_first = self.mlp_hidden_dim
        self.yak_mlp = False
        self.mlp_act = nn.GELU(approximate="tanh")
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim_first)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.hidden_size = hidden_size
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden_size, double=False) if modulation else None

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):  # noqa: B006
        mod = self.modulation(vec)[0] if self.modulation else vec
        qkv, hidden = torch.split(
            self.linear1(apply_mod(self.pre_norm(x), 1 + mod.scale, mod.shift)), [3 * self.hidden_size, self.mlp_hidden_dim_first], dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        x += apply_mod(self.linear2(torch.cat((attn, self.mlp_act(hidden)), 2)), mod.gate)
        return fp16_fix(x)


class QKNorm(nn.Module):
    """Neo's QKNorm casts both to v's dtype (Forge main's to each other's)."""

    def __init__(self, dim):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class LastLayer(flux.LastLayer):
    """Forge main's layers; Neo's forward takes ``vec`` with or without its token axis."""

    def forward(self, x, vec):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(apply_mod(self.norm_final(x), 1 + scale, shift))


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(
        self, in_channels, out_channels, vec_in_dim, context_in_dim, hidden_size, mlp_ratio, num_heads, depth, depth_single_blocks,
        axes_dim, theta, patch_size, qkv_bias, guidance_embed, txt_ids_dims,
    ):  # fmt: skip
        super().__init__()
        self.guidance_embed = guidance_embed
        self.patch_size = patch_size
        self.in_channels = in_channels * patch_size * patch_size
        self.out_channels = out_channels * patch_size * patch_size
        self.axes_dim = axes_dim
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pe_embedder = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=axes_dim)
        self.img_in = nn.Linear(self.in_channels, hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size)
        self.vec_in_dim = vec_in_dim
        self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.txt_norm = None
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels)
        self.txt_ids_dims = txt_ids_dims
        self.global_modulation = False
        self.default_ref_method = "offset"

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None, transformer_options={}, attn_mask=None):  # noqa: B006
        """Neo's order: ``img_in``, ``vec`` (guidance only when given; ``y`` cut to ``vec_in_dim``),
        ``txt_in``, ``post_input`` patches, ``pe``, the double blocks (ControlNet input adds; Neo's
        ``dit`` block replace patches are left out), ``fp16_fix`` of the image, the single blocks (ControlNet output adds),
        the final layer on the image tokens."""
        patches = transformer_options.get("patches", {})
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        vec = vec + self.vector_in(y[:, : self.vec_in_dim])
        txt = self.txt_in(txt)
        for patch in patches.get("post_input", []):
            out = patch({"img": img, "txt": txt, "img_ids": img_ids, "txt_ids": txt_ids})
            img, txt, img_ids, txt_ids = out["img"], out["txt"], out["img_ids"], out["txt_ids"]
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
            if control is not None and i < len(control["input"]) and control["input"][i] is not None:
                img[:, : control["input"][i].shape[1]] += control["input"][i]
        img = torch.cat((txt, fp16_fix(img)), 1)
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
            if control is not None and i < len(control["output"]) and control["output"][i] is not None:
                img[:, txt.shape[1] : txt.shape[1] + control["output"][i].shape[1]] += control["output"][i]
        return self.final_layer(img[:, txt.shape[1] :, ...], vec)

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        """Circular pad to the patch size, patches, and ids ``(index, row + h_offset, column + w_offset)``
        in float32 (offsets in latent pixels, converted to patches)."""
        batch, patch = x.shape[0], self.patch_size
        h, w = x.shape[-2:]
        img = rearrange(pad_to_patch_size(x, (patch, patch)), "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch)
        h_len, w_len = (h + patch // 2) // patch, (w + patch // 2) // patch
        h_offset, w_offset = (h_offset + patch // 2) // patch, (w_offset + patch // 2) // patch
        img_ids = torch.zeros((h_len, w_len, len(self.axes_dim)), device=x.device, dtype=torch.float32)
        img_ids[:, :, 0] = img_ids[:, :, 1] + index
        rows = torch.linspace(h_offset, h_len - 1 + h_offset, steps=h_len, device=x.device, dtype=torch.float32)
        img_ids[:, :, 1] = img_ids[:, :, 1] + rows.unsqueeze(1)
        columns = torch.linspace(w_offset, w_len - 1 + w_offset, steps=w_len, device=x.device, dtype=torch.float32)
        img_ids[:, :, 2] = img_ids[:, :, 2] + columns.unsqueeze(0)
        return img, repeat(img_ids, "h w c -> b (h w) c", b=batch)

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        """Patches and ids; each Kontext reference of ``dynamic_args["ref_latents"]`` (not the
        ``ref_latents`` argument) appended to the image tokens, ids by the "offset" method; zero text
        ids; ``forward_orig`` with the timestep /1000; the reference tokens cut; unpatched."""
        _, _, h_orig, w_orig = x.shape
        h_len, w_len = (h_orig + self.patch_size // 2) // self.patch_size, (w_orig + self.patch_size // 2) // self.patch_size
        img, img_ids = self.process_img(x)
        img_tokens = img.shape[1]
        h = w = 0
        for ref in dynamic_args.get("ref_latents") or []:
            h_offset, w_offset = (0, w) if ref.shape[-2] + h > ref.shape[-1] + w else (h, 0)
            h, w = max(h, ref.shape[-2] + h_offset), max(w, ref.shape[-1] + w_offset)
            kontext, kontext_ids = self.process_img(ref, index=1, h_offset=h_offset, w_offset=w_offset)
            img, img_ids = torch.cat([img, kontext], dim=1), torch.cat([img_ids, kontext_ids], dim=1)
        txt_ids = torch.zeros((x.shape[0], context.shape[1], len(self.axes_dim)), device=x.device, dtype=torch.float32)
        attn_mask = kwargs.get("attention_mask")
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep / 1000.0, y, guidance, control, transformer_options, attn_mask)
        out = out[:, :img_tokens]
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h_len, w=w_len, ph=self.patch_size, pw=self.patch_size)[
            :, :, :h_orig, :w_orig
        ]
