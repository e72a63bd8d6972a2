"""An independent reference of NAG on ERNIE-Image (tests/forge/backend/nn/ernie.py), written from the
authors' single-stream rule for image-first models (ChenDarYen/ComfyUI-NAG @ ef8a641, hidream/model.py:
HiDream's single-stream blocks and NAGHiDreamImageTransformer2DModel; the authors have no ERNIE code):
every positive row gets a full NAG row ``[copy of its image tokens; NAG text]`` that goes through every
layer with its own modulation (here its positive row's: ERNIE's adaLN is the time embedding's alone),
with the position ids the model gives such a sequence (NAG text ``0 … L′−1`` on axis 0, the image at
axis 0 = L′, ``rope_options`` as the model applies them); in each layer the positive row's image
attention output is guided away from the NAG row's and written into both, text outputs stay unguided,
and each row runs its own out-projection, gates and MLP; the NAG rows are dropped at the end.

The RoPE, the attention, the time embedding and the position ids are written here from the model's
behaviour; the model's linear layers and norms are called. Computed in ``dtype`` (float64 by default)."""

import copy
import math

import torch
from einops import rearrange
from reference import reference_nag


def position_ids(text_tokens, grid, rope_options=None):
    """``[N + L, 3]``: the image (axis 0 = L + shift_t; rows and columns scaled and shifted), then the text (axis 0 = 0 … L−1)."""
    options = rope_options or {}
    rows = options.get("shift_y", 0.0) + options.get("scale_y", 1.0) * torch.arange(grid[0], dtype=torch.float64)
    columns = options.get("shift_x", 0.0) + options.get("scale_x", 1.0) * torch.arange(grid[1], dtype=torch.float64)
    image = torch.stack(torch.meshgrid(rows, columns, indexing="ij"), dim=-1).reshape(-1, 2)
    image = torch.cat([torch.full((len(image), 1), text_tokens + options.get("shift_t", 0.0), dtype=torch.float64), image], dim=1)
    text = torch.zeros(text_tokens, 3, dtype=torch.float64)
    text[:, 0] = torch.arange(text_tokens)
    return torch.cat([image, text])


def rotary_angles(ids, axes_dim, theta):
    """``[S, Dh/2]`` angles: for each axis, its position times ``theta^(−2i/axis_dim)``."""
    frequencies = [theta ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim) for dim in axes_dim]
    return torch.cat([ids[:, [axis]] * omega for axis, omega in enumerate(frequencies)], -1)


def rotate(x, angles):
    """ERNIE's RoPE on ``[B, S, H, Dh]``: channel i and channel i + Dh/2 form a pair; the first of the pair
    turns with angle ``angles[i // 2]`` (the first half of the frequencies), the second with
    ``angles[Dh/4 + i // 2]`` (the second half)."""
    half = angles.shape[-1] // 2

    def table(angle, function):  # made in float64, used in x's dtype, as the model's tables
        return function(angle.repeat_interleave(2, dim=-1)[:, None, :]).to(x.dtype)

    top, bottom = angles[:, :half], angles[:, half:]
    cos_top, sin_top, cos_bottom, sin_bottom = (
        table(top, torch.cos),
        table(top, torch.sin),
        table(bottom, torch.cos),
        table(bottom, torch.sin),
    )
    first, second = x.chunk(2, dim=-1)
    return torch.cat([cos_top * first - sin_top * second, sin_bottom * first + cos_bottom * second], dim=-1)


def attention_output(attention, x, angles):
    """``ErnieImageAttention`` before ``to_out[0]``: ``[B, S, H·Dh]``."""
    batch, tokens, _ = x.shape

    def heads(t):
        return t.view(batch, tokens, attention.heads, attention.head_dim)

    q = rotate(attention.norm_q(heads(attention.to_q(x))), angles).transpose(1, 2)
    k = rotate(attention.norm_k(heads(attention.to_k(x))), angles).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) / attention.head_dim**0.5).softmax(dim=-1)
    return (weights @ heads(attention.to_v(x)).transpose(1, 2)).transpose(1, 2).reshape(batch, tokens, -1)


def time_embedding(model, timesteps, dtype):
    """``[sin, cos]`` of ``timesteps · 10000^(−i/half)``, in float32 as the model makes them (the angles
    reach 1000 rad: float64 ones would differ by ~1e-4), then the model's ``time_embedding``."""
    half = model.hidden_size // 2
    angles = timesteps[:, None].float() * torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    return model.time_embedding(torch.cat([angles.sin(), angles.cos()], dim=-1).to(dtype))


def reference_ernie(model, x, timesteps, context, cond_rows, nag_context, nag, rope_options=None, dtype=torch.float64):
    """The model's output with NAG on ``cond_rows`` (``nag_context[i]`` is the NAG negative of
    ``cond_rows[i]``), computed in ``dtype``, returned in x's dtype. ``nag`` is (scale, tau, alpha)."""
    model = copy.deepcopy(model).to(dtype)
    out_dtype, (x, timesteps, context, nag_context) = x.dtype, (t.to(dtype) for t in (x, timesteps, context, nag_context))
    patch = model.patch_size
    grid = (x.shape[2] // patch, x.shape[3] // patch)
    image_tokens = grid[0] * grid[1]
    image = model.x_embedder(x)
    streams = [torch.cat([image, model.text_proj(context)], 1), torch.cat([image[cond_rows], model.text_proj(nag_context)], 1)]
    angles = [
        rotary_angles(position_ids(s.shape[1] - image_tokens, grid, rope_options), model.pos_embed.axes_dim, model.pos_embed.theta)
        for s in streams
    ]
    c = time_embedding(model, timesteps, dtype)
    temb = [t[:, None] for t in model.adaLN_modulation(c).chunk(6, dim=-1)]
    modulations = [temb, [t[cond_rows] for t in temb]]
    for layer in model.layers:
        outs = []
        for stream, (shift, scale, *_), stream_angles in zip(streams, modulations, angles, strict=True):
            outs.append(attention_output(layer.self_attention, layer.adaLN_sa_ln(stream) * (1 + scale) + shift, stream_angles))
        guided = reference_nag(outs[0][cond_rows, :image_tokens], outs[1][:, :image_tokens], *nag).to(dtype)
        outs[0][cond_rows, :image_tokens] = guided
        outs[1][:, :image_tokens] = guided
        for i, (_, _, gate, shift_mlp, scale_mlp, gate_mlp) in enumerate(modulations):
            stream = streams[i] + gate * layer.self_attention.to_out[0](outs[i])
            streams[i] = stream + gate_mlp * layer.mlp(layer.adaLN_mlp_ln(stream) * (1 + scale_mlp) + shift_mlp)
    patches = model.final_linear(model.final_norm(streams[0], c))[:, :image_tokens]
    return rearrange(patches, "b (h w) (ph pw c) -> b c (h ph) (w pw)", h=grid[0], ph=patch, pw=patch).to(out_dtype)
