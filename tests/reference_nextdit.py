"""An independent reference of NAG on NextDiT (Z-Image, Lumina 2). The authors' ComfyUI-NAG (ef8a641)
has no NextDiT code; this follows their single-stream rule (flux/layers.py NAGSingleStreamBlock,
hidream/model.py, hunyuan_video/model.py): each positive row gets a NAG row that is a whole
``[NAG caption; image]`` stream with its own modulation (NextDiT's reads the timestep only: the positive
row's); in each layer both rows attend over their own tokens, the positive row's image attention output
(before the out-projection) is guided away from the NAG row's and written into both, and each row runs
the rest of the block on its own tokens. The final layer sees the batch rows only.

The NAG row is built as the model builds a ``[NAG caption; image]`` sequence: the model's own
``patchify_and_embed`` of the positive row's latent with the NAG caption gives its refined caption and
its rotary positions (caption ``1…L′``, the image at ``L′ + 1``, Z-Image's image pad tokens at 0); its image
tokens are the positive row's after the noise refiner, which sees the image alone (the authors' NAG rows
share the positive image stream wherever it is computed without the text). Everything else is written
here: plain softmax attention per head with k/v repeated per query head, RoPE as 2×2 rotations, the
blocks' residual arithmetic, the patches' order. It runs on a copy of the stand-in model in float64."""

import copy

import torch
import torch.nn.functional as F
from reference import reference_nag


def rotated(t, freqs):
    """``t [B, L, H, Dh]`` with each pair of channels rotated by ``freqs [B, L, 1, Dh/2, 2, 2]``."""
    pairs = t.reshape(*t.shape[:-1], -1, 1, 2)
    return (freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]).reshape(t.shape)


def attention(block, x, scale, freqs):
    """The block's attention output before ``out``, heads merged, on ``x`` modulated by ``scale``."""
    a = block.attention
    rows, tokens, _ = x.shape
    widths = [a.n_local_heads * a.head_dim, a.n_local_kv_heads * a.head_dim, a.n_local_kv_heads * a.head_dim]
    q, k, v = torch.split(a.qkv(block.attention_norm1(x) * (1 + scale[:, None])), widths, dim=-1)
    q = rotated(a.q_norm(q.reshape(rows, tokens, a.n_local_heads, a.head_dim)), freqs)
    k = rotated(a.k_norm(k.reshape(rows, tokens, a.n_local_kv_heads, a.head_dim)), freqs)
    v = v.reshape(rows, tokens, a.n_local_kv_heads, a.head_dim)
    repeats = a.n_local_heads // a.n_local_kv_heads  # query head h reads key/value head h // repeats
    q, k, v = q.transpose(1, 2), k.repeat_interleave(repeats, dim=2).transpose(1, 2), v.repeat_interleave(repeats, dim=2).transpose(1, 2)
    weights = (q @ k.transpose(-1, -2) / a.head_dim**0.5).softmax(dim=-1)
    return (weights @ v).transpose(1, 2).reshape(rows, tokens, -1)


def rest_of_block(block, x, attended, modulation):
    """Out-projection, sandwich norms, tanh gates and the scale-modulated feed-forward."""
    _, gate_attention, scale_mlp, gate_mlp = (m[:, None] for m in modulation)
    x = x + gate_attention.tanh() * block.attention_norm2(block.attention.out(attended))
    return x + gate_mlp.tanh() * block.ffn_norm2(block.feed_forward(block.ffn_norm1(x) * (1 + scale_mlp)))


def reference_nextdit(model, x, timesteps, context, positive_rows, nag_context, nag, dtype=torch.float64):
    """The model's output with NAG on ``positive_rows`` (``nag_context[i]`` the NAG negative of
    ``positive_rows[i]``), computed in ``dtype`` and returned as x's dtype. ``nag`` is (scale, tau, alpha)."""
    model = copy.deepcopy(model).to(dtype)
    out_dtype, (x, timesteps, context, nag_context) = x.dtype, (t.to(dtype) for t in (x, timesteps, context, nag_context))
    p, (height, width) = model.patch_size, x.shape[2:]
    x = F.pad(x, (0, -width % p, 0, -height % p), mode="circular")
    t = model.t_embedder((1 - timesteps) * model.time_scale, dtype=dtype)
    stream, _, _, (caption, *_), freqs = model.patchify_and_embed(x, model.cap_embedder(context), None, t, None)
    nag_stream, _, _, (nag_caption, *_), nag_freqs = model.patchify_and_embed(
        x[positive_rows], model.cap_embedder(nag_context), None, t[positive_rows], None
    )
    nag_stream = torch.cat((nag_stream[:, :nag_caption], stream[positive_rows, caption:]), dim=1)
    for block in model.layers:
        modulation = block.adaLN_modulation(t).chunk(4, dim=1)
        nag_modulation = [m[positive_rows] for m in modulation]
        attended = attention(block, stream, modulation[0], freqs)
        nag_attended = attention(block, nag_stream, nag_modulation[0], nag_freqs)
        guided = reference_nag(attended[positive_rows, caption:], nag_attended[:, nag_caption:], *nag).to(dtype)
        attended[positive_rows, caption:] = guided
        nag_attended[:, nag_caption:] = guided
        stream = rest_of_block(block, stream, attended, modulation)
        nag_stream = rest_of_block(block, nag_stream, nag_attended, nag_modulation)
    out = model.final_layer(stream, t)
    rows, columns, channels = x.shape[2] // p, x.shape[3] // p, model.out_channels
    patches = out[:, caption : caption + rows * columns].reshape(len(out), rows, columns, p, p, channels)
    image = patches.permute(0, 5, 1, 3, 2, 4).reshape(len(out), channels, rows * p, columns * p)
    return -image[:, :, :height, :width].to(out_dtype)
