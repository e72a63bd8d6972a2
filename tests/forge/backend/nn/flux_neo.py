"""Mirrors backend/nn/flux.py of Forge Neo (Haoming02/sd-webui-forge-classic, neo, read at
06d6af9a9b98436d013b398ab35f0b0bf8a888ce; Neo's port of ComfyUI v0.9 comfy/ldm/flux): Flux.1, Kontext
and Flux.2 (Klein: ``global_modulation``, ``mlp_silu_act``, ``txt_ids_dims``, ``txt_norm``, the
"index" reference ids), the same class and attribute names and order of operations, written from its
behaviour.

From the later copy of Neo v3.5 (exo101/sd-webui-forge-neo-v3 @ 5692d2d1, ``webui/backend/nn/flux.py``):
the reference tokens and ids expanded to the batch (06d6af9a concatenates them as they come, which
only works for references with the batch's rows) and, with ``timestep_divisor=1``, its ``forward``,
which hands the timestep to ``forward_orig`` unchanged (its predictor gives σ; 06d6af9a's ``forward``
divides by 1000, the default here).

Left out: the yak MLP (``yak_mlp``: no Neo engine loads such a model; the attribute stays False),
``flipped_img_txt`` other than False, the "uxo" reference method, ``dit`` block replace patches,
``modulation_dims``, the ``del``s, the mps/xpu ``rope`` branch and ``transformer_options``' block
counters. Where Neo behaves as Forge main, the main stand-in's pieces are used
(``timestep_embedding``, ``EmbedND``, ``MLPEmbedder``, ``RMSNorm``, ``QKNorm``'s norms,
``split_heads``); the stand-in's own ``timestep_divisor`` argument is not Neo's."""

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


class SiLUActivation(nn.Module):
    """Flux.2's gated activation: ``silu(first half) · second half``."""

    def __init__(self):
        super().__init__()
        self.gate_fn = nn.SiLU()

    def forward(self, x):
        x1, x2 = x.chunk(2, dim=-1)
        return self.gate_fn(x1) * x2


def build_mlp(hidden_size, mlp_hidden_dim, mlp_silu_act=False):
    """Flux.1's GELU MLP with biases, or Flux.2's gated SiLU MLP without."""
    if mlp_silu_act:
        return nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden_dim * 2, bias=False), SiLUActivation(), nn.Linear(mlp_hidden_dim, hidden_size, bias=False)
        )
    return nn.Sequential(
        nn.Linear(hidden_size, mlp_hidden_dim, bias=True), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden_dim, hidden_size, bias=True)
    )


class QKNorm(flux.QKNorm):
    """Forge main's norms; Neo's forward casts both to v's dtype (Forge main's to each other's)."""

    def forward(self, q, k, v):
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """Only its submodules are used: the blocks call ``qkv``, ``norm`` and ``proj`` themselves."""

    def __init__(self, dim, num_heads=8, qkv_bias=False, proj_bias=True):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """``vec [B, D]`` → ``(ModulationOut, ModulationOut)`` (double) or ``(ModulationOut, None)``, each
    tensor ``[B, 1, D]``."""

    def __init__(self, dim, double, bias=True):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=bias)

    def forward(self, vec):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        out = self.lin(nn.functional.silu(vec)).chunk(self.multiplier, dim=-1)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


def apply_mod(tensor, m_mult, m_add=None, modulation_dims=None):
    """Neo's modulation without ``modulation_dims``: ``m_add + tensor·m_mult`` in one ``addcmul``."""
    return tensor * m_mult if m_add is None else torch.addcmul(m_add, tensor, m_mult)


class DoubleStreamBlock(nn.Module):
    """Without modulation layers (``modulation=False``: Chroma, Flux.2) ``vec`` is the modulations,
    ``((img_mod1, img_mod2), (txt_mod1, txt_mod2))``."""

    def __init__(
        self, hidden_size, num_heads, mlp_ratio, qkv_bias=False, flipped_img_txt=False, modulation=True, mlp_silu_act=False, proj_bias=True,
    ):  # fmt: skip
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.modulation = modulation
        if modulation:
            self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = build_mlp(hidden_size, mlp_hidden_dim, mlp_silu_act)
        if modulation:
            self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = build_mlp(hidden_size, mlp_hidden_dim, mlp_silu_act)
        self.flipped_img_txt = flipped_img_txt

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
    """Without a modulation layer (``modulation=False``: Chroma, Flux.2) ``vec`` is the ``ModulationOut``.
    Flux.2's gated MLP makes ``linear1``'s MLP part twice as wide as ``linear2`` reads
    (``mlp_hidden_dim_first``)."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, modulation=True, mlp_silu_act=False, bias=True):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.mlp_hidden_dim_first = self.mlp_hidden_dim
        self.yak_mlp = False
        if mlp_silu_act:
            self.mlp_hidden_dim_first = int(hidden_size * mlp_ratio * 2)
            self.mlp_act = SiLUActivation()
        else:
            self.mlp_act = nn.GELU(approximate="tanh")
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim_first, bias=bias)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size, bias=bias)
        self.norm = QKNorm(hidden_size // num_heads)
        self.hidden_size = hidden_size
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.modulation = Modulation(hidden_size, double=False) if modulation else None

    def forward(self, x, vec, pe, attn_mask=None, transformer_options={}):  # noqa: B006
        mod = self.modulation(vec)[0] if self.modulation else vec
        qkv, mlp = torch.split(
            self.linear1(apply_mod(self.pre_norm(x), 1 + mod.scale, mod.shift)), [3 * self.hidden_size, self.mlp_hidden_dim_first], dim=-1
        )
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, mask=attn_mask, transformer_options=transformer_options)
        x += apply_mod(self.linear2(torch.cat((attn, self.mlp_act(mlp)), 2)), mod.gate)
        return fp16_fix(x)


class LastLayer(nn.Module):
    """Neo's forward takes ``vec`` with or without its token axis."""

    def __init__(self, hidden_size, patch_size, out_channels, bias=True):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=bias)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=bias))

    def forward(self, x, vec):
        if vec.ndim == 2:
            vec = vec[:, None, :]
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=-1)
        return self.linear(apply_mod(self.norm_final(x), 1 + scale, shift))


class IntegratedFluxTransformer2DModel(nn.Module):
    def __init__(
        self, in_channels, out_channels, vec_in_dim, context_in_dim, hidden_size, mlp_ratio, num_heads, depth, depth_single_blocks,
        axes_dim, theta, patch_size, qkv_bias, guidance_embed, txt_ids_dims, global_modulation=False, mlp_silu_act=False, ops_bias=True,
        default_ref_method="offset", ref_index_scale=1.0, txt_norm=False, timestep_divisor=1000.0,
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
        self.img_in = nn.Linear(self.in_channels, hidden_size, bias=ops_bias)
        self.time_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size, bias=ops_bias)
        if vec_in_dim is not None:  # Flux.2 has no pooled vector
            self.vec_in_dim = vec_in_dim
            self.vector_in = MLPEmbedder(vec_in_dim, hidden_size)
        self.guidance_in = MLPEmbedder(in_dim=256, hidden_dim=hidden_size, bias=ops_bias) if guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(context_in_dim, hidden_size, bias=ops_bias)
        self.txt_norm = RMSNorm(context_in_dim) if txt_norm else None
        per_block = {"modulation": global_modulation is False, "mlp_silu_act": mlp_silu_act}
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, proj_bias=ops_bias, **per_block) for _ in range(depth)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(hidden_size, num_heads, mlp_ratio, bias=ops_bias, **per_block) for _ in range(depth_single_blocks)]
        )
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels, bias=ops_bias)
        if global_modulation:  # one modulation of the time embedding for every block of a kind
            self.double_stream_modulation_img = Modulation(hidden_size, double=True, bias=False)
            self.double_stream_modulation_txt = Modulation(hidden_size, double=True, bias=False)
            self.single_stream_modulation = Modulation(hidden_size, double=False, bias=False)
        self.txt_ids_dims = txt_ids_dims
        self.global_modulation = global_modulation
        self.default_ref_method = default_ref_method
        self.ref_index_scale = ref_index_scale
        self.timestep_divisor = timestep_divisor

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, control=None, transformer_options={}, attn_mask=None):  # noqa: B006
        """Neo's order: ``img_in``, ``vec`` (guidance only when given; ``y`` zeros when not given, cut to
        ``vec_in_dim``; none without ``vec_in_dim``), ``txt_norm``, ``txt_in``, the global modulations,
        ``post_input`` patches, ``pe``, the double blocks (ControlNet input adds; Neo's ``dit`` block replace
        patches are left out), ``fp16_fix`` of the image, the single blocks (ControlNet output adds), the
        final layer on the image tokens with the time vector."""
        patches = transformer_options.get("patches", {})
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps, 256).to(img.dtype))
        if self.guidance_embed and guidance is not None:
            vec = vec + self.guidance_in(timestep_embedding(guidance, 256).to(img.dtype))
        if hasattr(self, "vec_in_dim"):
            if y is None:
                y = torch.zeros((img.shape[0], self.vec_in_dim), device=img.device, dtype=img.dtype)
            vec = vec + self.vector_in(y[:, : self.vec_in_dim])
        if self.txt_norm is not None:
            txt = self.txt_norm(txt)
        txt = self.txt_in(txt)
        vec_orig = vec
        if self.global_modulation:
            vec = (self.double_stream_modulation_img(vec_orig), self.double_stream_modulation_txt(vec_orig))
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
        if self.global_modulation:
            vec, _ = self.single_stream_modulation(vec_orig)
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            img = block(img, vec=vec, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
            if control is not None and i < len(control["output"]) and control["output"][i] is not None:
                img[:, txt.shape[1] : txt.shape[1] + control["output"][i].shape[1]] += control["output"][i]
        return self.final_layer(img[:, txt.shape[1] :, ...], vec_orig)

    def process_img(self, x, index=0, h_offset=0, w_offset=0):
        """Circular pad to the patch size, patches, and ids ``(index, row + h_offset, column + w_offset, 0…)``
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

    def reference_offsets(self, ref, method, placed):
        """One reference's ``(index, h_offset, w_offset)`` by ``method`` ("index": Flux.2, index 10, 20, …
        by ``ref_index_scale``; "offset": Flux.1 Kontext, index 1, placed beside the earlier references),
        ``placed`` the running ``[index, h, w]`` Neo keeps in its loop."""
        if method == "index":
            placed[0] += self.ref_index_scale
            return placed[0], 0, 0
        h, w = placed[1:]
        h_offset, w_offset = (0, w) if ref.shape[-2] + h > ref.shape[-1] + w else (h, 0)
        placed[1:] = max(h, ref.shape[-2] + h_offset), max(w, ref.shape[-1] + w_offset)
        return 1, h_offset, w_offset

    def forward(self, x, timestep, context, y=None, guidance=None, ref_latents=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        """Patches and ids; each reference latent of ``dynamic_args["ref_latents"]`` (not the
        ``ref_latents`` argument) appended to the image tokens, expanded to the batch; text ids zero but
        on ``txt_ids_dims`` (``0…L−1``); ``forward_orig`` with the timestep / ``timestep_divisor``; the
        reference tokens cut; unpatched."""
        _, _, h_orig, w_orig = x.shape
        h_len, w_len = (h_orig + self.patch_size // 2) // self.patch_size, (w_orig + self.patch_size // 2) // self.patch_size
        img, img_ids = self.process_img(x)
        img_tokens = img.shape[1]
        placed = [0, 0, 0]
        for ref in dynamic_args.get("ref_latents") or []:
            index, h_offset, w_offset = self.reference_offsets(ref, kwargs.get("ref_latents_method", self.default_ref_method), placed)
            kontext, kontext_ids = self.process_img(ref.to(x), index=index, h_offset=h_offset, w_offset=w_offset)
            img = torch.cat([img, kontext.expand(img.shape[0], *kontext.shape[1:])], dim=1)
            img_ids = torch.cat([img_ids, kontext_ids.expand(img_ids.shape[0], *kontext_ids.shape[1:])], dim=1)
        txt_ids = torch.zeros((x.shape[0], context.shape[1], len(self.axes_dim)), device=x.device, dtype=torch.float32)
        for axis in self.txt_ids_dims:
            txt_ids[:, :, axis] = torch.linspace(0, context.shape[1] - 1, steps=context.shape[1], device=x.device, dtype=torch.float32)
        timestep, attn_mask = timestep / self.timestep_divisor, kwargs.get("attention_mask")
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep, y, guidance, control, transformer_options, attn_mask)
        out = out[:, :img_tokens]
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h_len, w=w_len, ph=self.patch_size, pw=self.patch_size)[
            :, :, :h_orig, :w_orig
        ]
