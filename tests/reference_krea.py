"""An independent reference of NAG on Krea 2 (tests/forge/backend/nn/krea.py), written from the authors'
single-stream rule for text-first models (ChenDarYen/ComfyUI-NAG @ ef8a641, flux/layers.py
NAGSingleStreamBlock and flux/model.py NAGFlux; the authors have no Krea code): every positive row gets a
full NAG row ``[NAG text; copy of its image tokens]`` that goes through every block with its own
modulation (here its positive row's: Krea's is the time embedding's alone) and the model's position ids
(text all zero, image (0, row, column)); in each block the positive row's image attention output is
guided away from the NAG row's and written into both, before each row's own output gate
``sigmoid(gate(x))``, out-projection, gates and MLP; text outputs stay unguided; the NAG rows are
dropped at the end. The NAG text goes through the model's text fusion and ``txtmlp`` as the prompt does.

The RoPE, the grouped-query attention, the time embedding and the patching are written here from the
model's behaviour; the model's linear layers, norms, text fusion and last layer are called. Computed in
``dtype`` (float64 by default)."""

import copy
import math

import torch
from einops import rearrange
from reference import reference_nag


def rotary_angles(ids, axes_dim, theta):
    """``[S, Dh/2]``: for each axis, its position times ``theta^(−2i/axis_dim)``."""
    frequencies = [theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim) for dim in axes_dim]
    return torch.cat([ids[:, [axis]] * omega for axis, omega in enumerate(frequencies)], -1)


def rotate(x, angles):
    """Flux's RoPE on ``[B, H, S, Dh]``: adjacent channels ``(2i, 2i+1)`` turn by ``angles[i]``."""
    cos, sin = (f(angles).to(x.dtype) for f in (torch.cos, torch.sin))
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack([cos * even - sin * odd, sin * even + cos * odd], dim=-1).flatten(-2)


def attention_output(attention, x, angles):
    """``Attention`` before its gate: ``[B, S, H·Dh]``, each kv head serving ``heads/kvheads`` query heads."""
    batch, tokens, _ = x.shape

    def heads(t, count):
        return t.view(batch, tokens, count, -1).transpose(1, 2)

    q, k = attention.qknorm(heads(attention.wq(x), attention.heads), heads(attention.wk(x), attention.kvheads))
    q, k, v = rotate(q, angles), rotate(k, angles), heads(attention.wv(x), attention.kvheads)
    group = torch.arange(attention.heads) // (attention.heads // attention.kvheads)
    weights = (q @ k[:, group].transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)
    return (weights @ v[:, group]).transpose(1, 2).reshape(batch, tokens, -1)


def time_embedding(timesteps, dim):
    """``[cos, sin]`` of ``1000·t · 10000^(−i/half)``, in float32 as the model makes them."""
    half = dim // 2
    angles = (1000 * timesteps.float())[:, None] * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def reference_krea(model, x, timesteps, context, cond_rows, nag_context, nag, dtype=torch.float64, guide_gated=False):
    """The model's output with NAG on ``cond_rows`` (``nag_context[i]`` is the NAG negative of ``cond_rows[i]``,
    ``[1, tokens, layers·width]`` as the engine makes it), computed in ``dtype``, returned in x's dtype. ``x`` is
    ``[B, C, 1, H, W]``; ``nag`` is (scale, tau, alpha). ``guide_gated``: NAG on the gated attention output
    instead, a rule NAG does not follow, for the test that tells the two apart."""
    model = copy.deepcopy(model).to(dtype)
    out_dtype, (x, timesteps, context, nag_context) = x.dtype, (t.to(dtype) for t in (x, timesteps, context, nag_context))
    patch, (height, width) = model.patch, x.shape[-2:]
    x = torch.nn.functional.pad(x[:, :, 0], (0, -width % patch, 0, -height % patch), mode="circular")
    grid = (x.shape[-2] // patch, x.shape[-1] // patch)
    image = model.first(rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=patch, pw=patch))
    t = model.tmlp(time_embedding(timesteps, model.tdim).to(dtype)[:, None])
    vec = model.tproj(t)

    def text(c):
        return model.txtmlp(model.txtfusion(c[:, 0].reshape(*c.shape[::2], model.txtlayers, model.txtdim)))

    streams = [torch.cat([text(context), image], 1), torch.cat([text(nag_context), image[cond_rows]], 1)]
    image_ids = torch.stack(torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij"), -1).reshape(-1, 2)
    image_ids = torch.cat([torch.zeros(len(image_ids), 1), image_ids], 1).double()
    text_lengths = [s.shape[1] - len(image_ids) for s in streams]
    embedder = model.pe_embedder
    angles = [rotary_angles(torch.cat([torch.zeros(n, 3).double(), image_ids]), embedder.axes_dim, embedder.theta) for n in text_lengths]
    vecs = [vec, vec[cond_rows]]
    for block in model.blocks:
        modulations = [(v + block.mod.lin).chunk(6, dim=-1) for v in vecs]  # scale, shift, gate, scale, shift, gate
        normed = [(1 + m[0]) * block.prenorm(s) + m[1] for s, m in zip(streams, modulations, strict=True)]
        gates = [torch.sigmoid(block.attn.gate(n)) for n in normed]
        outs = [attention_output(block.attn, n, a) * (g if guide_gated else 1) for n, a, g in zip(normed, angles, gates, strict=True)]
        guided = reference_nag(outs[0][cond_rows, text_lengths[0] :], outs[1][:, text_lengths[1] :], *nag).to(dtype)
        outs[0][cond_rows, text_lengths[0] :] = guided
        outs[1][:, text_lengths[1] :] = guided
        for i, (out, g, m) in enumerate(zip(outs, gates, modulations, strict=True)):
            stream = streams[i] + m[2] * block.attn.wo(out if guide_gated else out * g)
            streams[i] = stream + m[5] * block.mlp((1 + m[3]) * block.postnorm(stream) + m[4])
    final = model.last(streams[0], t)[:, text_lengths[0] :]
    out = rearrange(final, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=grid[0], ph=patch, pw=patch)[:, :, :height, :width]
    return out[:, :, None].to(out_dtype)
