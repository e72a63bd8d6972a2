"""Mirrors backend/nn/krea.py of Forge Neo, read in a copy of Neo v3.5, exo101/sd-webui-forge-neo-v3 @
5692d2d1e6c293faf5486f7cb18c27c9a3faa758 (``webui/backend/nn/krea.py``, added in f95f632a; it cites
ComfyUI v0.26.1 ``comfy/ldm/krea2/model.py``): Krea 2's ``SingleStreamDiT``, with the same class, attribute
and argument names and order of operations, written from its behaviour; sizes are constructor arguments.

Mirrored: ``RMSNorm`` (weight ``scale + 1``, in float32), ``QKNorm``, ``SwiGLU`` (hidden width rounded up
to 128, ``mul_`` on a temporary), ``Attention`` (GQA: ``wq`` for ``heads``, ``wk``/``wv`` for ``kvheads``;
the output gate ``gate`` from the block's input; qk-norm, RoPE, k and v repeated per group with
``repeat_interleave``, ``attention_function(..., skip_reshape=True, transformer_options=...)``, then
``wo(out · sigmoid(gate))``), ``SimpleModulation``, ``DoubleSharedModulation`` (the shared ``tvec`` plus a
per-block ``lin``, chunked scale, shift, gate, scale, shift, gate), ``TextFusionBlock``,
``TextFusionTransformer`` (per-token attention across the encoder's layers, the ``projector``, then the
refiner over the tokens), ``SingleStreamBlock``, ``LastLayer`` (on ``t``, not ``tvec``), and
``SingleStreamDiT.forward`` without references: 5-D latents folded, padded to the patch size, the context
``[B, 1, L, layers·txtdim]`` squeezed and unpacked, ``[text; image]``, all text ids zero, the image ids
(0, row, column). ``EmbedND``, ``apply_rope`` and ``timestep_embedding`` come from the Flux stand-in, as
Neo's file imports them from its ``backend/nn/flux.py``.

Left out: the reference-latent path (``_pack_refs``, ``_block_ref_forward``, ``_forward_with_refs``), which
Neo's forward takes when ``ref_latents`` reach it; nothing in that copy passes them (its Krea engine
writes ``dynamic_args.ref_latents``, which this file never reads), so here such a call raises."""

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from backend.attention import attention_function
from backend.memory_management import cast_to
from backend.nn.flux import EmbedND, apply_rope, timestep_embedding
from backend.utils import pad_to_patch_size


class RMSNorm(nn.Module):
    def __init__(self, features, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.empty(features))

    def forward(self, x):
        weight = cast_to(self.scale, dtype=torch.float32, device=x.device) + 1.0
        return F.rms_norm(x.float(), (x.shape[-1],), weight=weight, eps=self.eps).to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.qnorm = RMSNorm(dim)
        self.knorm = RMSNorm(dim)

    def forward(self, q, k):
        return self.qnorm(q), self.knorm(k)


class SwiGLU(nn.Module):
    def __init__(self, features, multiplier, bias=False, multiple=128):
        super().__init__()
        hidden = int(2 * features / 3) * multiplier
        hidden = multiple * ((hidden + multiple - 1) // multiple)
        self.gate = nn.Linear(features, hidden, bias=bias)
        self.up = nn.Linear(features, hidden, bias=bias)
        self.down = nn.Linear(hidden, features, bias=bias)

    def forward(self, x):
        return self.down(F.silu(self.gate(x)).mul_(self.up(x)))


class Attention(nn.Module):
    def __init__(self, dim, heads, kvheads=None, bias=False):
        super().__init__()
        self.heads = heads
        self.kvheads = heads if kvheads is None else kvheads
        self.headdim = dim // heads
        self.wq = nn.Linear(dim, self.headdim * self.heads, bias=bias)
        self.wk = nn.Linear(dim, self.headdim * self.kvheads, bias=bias)
        self.wv = nn.Linear(dim, self.headdim * self.kvheads, bias=bias)
        self.gate = nn.Linear(dim, dim, bias=bias)
        self.qknorm = QKNorm(self.headdim)
        self.wo = nn.Linear(dim, dim, bias=bias)

    def forward(self, x, freqs=None, mask=None, transformer_options={}):  # noqa: B006 (Neo's signature)
        q, k, v, gate = self.wq(x), self.wk(x), self.wv(x), self.gate(x)
        q = rearrange(q, "B L (H D) -> B H L D", H=self.heads)
        k = rearrange(k, "B L (H D) -> B H L D", H=self.kvheads)
        v = rearrange(v, "B L (H D) -> B H L D", H=self.kvheads)
        q, k = self.qknorm(q, k)
        if freqs is not None:
            q, k = apply_rope(q, k, freqs)
        if self.kvheads != self.heads:
            k = k.repeat_interleave(self.heads // self.kvheads, dim=1)
            v = v.repeat_interleave(self.heads // self.kvheads, dim=1)
        out = attention_function(q, k, v, self.heads, mask=mask, skip_reshape=True, transformer_options=transformer_options)
        return self.wo(out * F.sigmoid(gate))


class SimpleModulation(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Parameter(torch.empty(2, dim))

    def forward(self, vec):
        scale, shift = (vec + cast_to(self.lin, dtype=vec.dtype, device=vec.device).unsqueeze(0)).chunk(2, dim=1)
        return scale, shift


class DoubleSharedModulation(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin = nn.Parameter(torch.empty(6 * dim))

    def forward(self, vec):
        return (vec + cast_to(self.lin, dtype=vec.dtype, device=vec.device)).chunk(6, dim=-1)


class TextFusionBlock(nn.Module):
    def __init__(self, features, heads, multiplier, bias=False, kvheads=None):
        super().__init__()
        self.prenorm = RMSNorm(features)
        self.postnorm = RMSNorm(features)
        self.attn = Attention(features, heads, kvheads=kvheads, bias=bias)
        self.mlp = SwiGLU(features, multiplier, bias)

    def forward(self, x, mask=None, transformer_options={}):  # noqa: B006
        x = x + self.attn(self.prenorm(x), mask=mask, transformer_options=transformer_options)
        return x + self.mlp(self.postnorm(x))


class TextFusionTransformer(nn.Module):
    def __init__(self, num_txt_layers, txt_dim, heads, multiplier, bias=False, kvheads=None):
        super().__init__()
        self.layerwise_blocks = nn.ModuleList([TextFusionBlock(txt_dim, heads, multiplier, bias, kvheads) for _ in range(2)])
        self.projector = nn.Linear(num_txt_layers, 1, bias=False)
        self.refiner_blocks = nn.ModuleList([TextFusionBlock(txt_dim, heads, multiplier, bias, kvheads) for _ in range(2)])

    def forward(self, x, mask=None, transformer_options={}):  # noqa: B006
        b, length, layers, d = x.shape
        x = x.reshape(b * length, layers, d)  # each token attends across the encoder's layers
        for block in self.layerwise_blocks:
            x = block(x.contiguous(), mask=None, transformer_options=transformer_options)
        x = self.projector(rearrange(x, "(b l) n d -> b l d n", b=b, l=length)).squeeze(-1)
        for block in self.refiner_blocks:
            x = block(x, mask=mask, transformer_options=transformer_options)
        return x


class SingleStreamBlock(nn.Module):
    def __init__(self, features, heads, multiplier, bias=False, kvheads=None):
        super().__init__()
        self.mod = DoubleSharedModulation(features)
        self.prenorm = RMSNorm(features)
        self.postnorm = RMSNorm(features)
        self.attn = Attention(features, heads, kvheads=kvheads, bias=bias)
        self.mlp = SwiGLU(features, multiplier, bias)

    def forward(self, x, vec, freqs, mask=None, transformer_options={}):  # noqa: B006
        prescale, preshift, pregate, postscale, postshift, postgate = self.mod(vec)
        x = x + pregate * self.attn((1 + prescale) * self.prenorm(x) + preshift, freqs, mask, transformer_options=transformer_options)
        return x + postgate * self.mlp((1 + postscale) * self.postnorm(x) + postshift)


class LastLayer(nn.Module):
    def __init__(self, features, patch, channels):
        super().__init__()
        self.norm = RMSNorm(features)
        self.linear = nn.Linear(features, patch * patch * channels, bias=True)
        self.modulation = SimpleModulation(features)

    def forward(self, x, tvec):
        scale, shift = self.modulation(tvec)
        return self.linear((1 + scale) * self.norm(x) + shift)


class SingleStreamDiT(nn.Module):
    def __init__(
        self,
        features=6144,
        tdim=256,
        txtdim=2560,
        heads=48,
        kvheads=12,
        multiplier=4,
        layers=28,
        patch=2,
        channels=16,
        bias=False,
        theta=1e3,
        txtlayers=12,
        txtheads=20,
        txtkvheads=20,
        **kwargs,
    ):
        super().__init__()
        self.patch = patch
        self.channels = channels
        self.tdim = tdim
        self.heads = heads
        self.txtdim = txtdim
        self.txtlayers = txtlayers
        headdim = features // heads
        axes = [headdim - 12 * (headdim // 16), 6 * (headdim // 16), 6 * (headdim // 16)]
        self.pe_embedder = EmbedND(dim=headdim, theta=int(theta), axes_dim=axes)
        self.first = nn.Linear(channels * patch**2, features, bias=True)
        self.blocks = nn.ModuleList([SingleStreamBlock(features, heads, multiplier, bias, kvheads) for _ in range(layers)])
        self.tmlp = nn.Sequential(nn.Linear(tdim, features), nn.GELU(approximate="tanh"), nn.Linear(features, features))
        self.txtfusion = TextFusionTransformer(txtlayers, txtdim, txtheads, multiplier, bias, txtkvheads)
        self.txtmlp = nn.Sequential(
            RMSNorm(txtdim), nn.Linear(txtdim, features), nn.GELU(approximate="tanh"), nn.Linear(features, features)
        )
        self.last = LastLayer(features, patch, channels)
        self.tproj = nn.Sequential(nn.GELU(approximate="tanh"), nn.Linear(features, features * 6))

    def forward(self, x, timesteps, context, attention_mask=None, transformer_options={}, **kwargs):  # noqa: B006
        references = kwargs.get("ref_latents")
        if references is not None and len(references) > 0:
            raise NotImplementedError("the reference-latent path is left out of this stand-in")
        temporal = x.ndim == 5
        if temporal:
            b5, c5, t5, h5, w5 = x.shape
            x = x.reshape(b5 * t5, c5, h5, w5)
        bs, _, height, width = x.shape
        patch = self.patch
        x = pad_to_patch_size(x, (patch, patch))
        rows, columns = x.shape[-2] // patch, x.shape[-1] // patch
        context = self._unpack_context(context.squeeze(1))

        img = self.first(rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch))
        t = self.tmlp(timestep_embedding(timesteps, self.tdim).unsqueeze(1).to(img.dtype))
        tvec = self.tproj(t)
        context = self.txtmlp(self.txtfusion(context, mask=None, transformer_options=transformer_options))

        text_tokens, image_tokens = context.shape[1], img.shape[1]
        combined = torch.cat((context, img), dim=1)
        device = combined.device
        text_ids = torch.zeros(bs, text_tokens, 3, device=device, dtype=torch.float32)
        image_ids = torch.zeros(rows, columns, 3, device=device, dtype=torch.float32)
        image_ids[..., 1] = torch.arange(rows, device=device, dtype=torch.float32)[:, None]
        image_ids[..., 2] = torch.arange(columns, device=device, dtype=torch.float32)[None, :]
        freqs = self.pe_embedder(torch.cat((text_ids, image_ids.reshape(1, rows * columns, 3).repeat(bs, 1, 1)), dim=1))

        for block in self.blocks:
            combined = block(combined, tvec, freqs, None, transformer_options=transformer_options)

        final = self.last(combined, t)[:, text_tokens : text_tokens + image_tokens, :]
        out = rearrange(final, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=rows, w=columns, ph=patch, pw=patch, c=self.channels)
        out = out[:, :, :height, :width]
        if temporal:
            out = out.reshape(b5, t5, self.channels, height, width).movedim(1, 2)
        return out

    def _unpack_context(self, context):
        b, seq, fused = context.shape
        if fused != self.txtlayers * self.txtdim:
            raise ValueError(f"Krea2 expects conditioning with {self.txtlayers}x{self.txtdim} features but got {fused}")
        return context.reshape(b, seq, self.txtlayers, self.txtdim)
