"""The ERNIE-Image family on Forge Neo: ``ErnieImageModel`` (``backend/nn/ernie.py``, Neo's port of
ComfyUI's ``comfy/ldm/ernie/model.py``; engine ``ErnieImage``, ``backend/diffusion_engine/ernie.py``),
read in a copy of Neo v3.5, exo101/sd-webui-forge-neo-v3 @ 5692d2d1.

The model is 36 single-stream layers over ``[image; text]`` tokens, all modulated by one shared adaLN
of the time embedding. The authors' ComfyUI-NAG (ef8a641) has no ERNIE-Image code; NAG here follows
their single-stream rule for image-first models (HiDream's single-stream blocks, ``hidream/model.py``):
each positive row gets a NAG row ``[image; NAG text]`` with the model's own positions for that sequence,
its image tokens' attention output (before ``to_out[0]``) is guided away from the NAG row's and written
into both rows, text outputs stay unguided, and each row runs its own out-projection, gates and MLP.
The modulation carries no text, so the NAG row's image tokens stay equal to its positive row's: the NAG
rows are run as their text tokens alone, attending with the positive rows' image q/k/v
(``single_stream_text_attention``, image first).

Positions: ERNIE's RoPE puts the text at axis-0 positions ``0 … L−1`` and the image at axis 0 = L, and
its rotation is not a function of position differences (of a channel pair, the first channel turns with
a frequency from the first half of the table, the second with one from the second half, often of another
axis), so no shift of the NAG text's positions reproduces the model's own sequence. The NAG rows
therefore take the positions the model gives an ``[image; NAG text]`` sequence (image at axis 0 = L′,
text ``0 … L′−1``), and their image q/k are their positive rows' before the RoPE, rotated with those
positions: exactly the model's own NAG sequence, for one extra RoPE over the image tokens per NAG row
and layer. ``rope_options`` in ``transformer_options`` are honoured for both sequences, as the model
applies them.

The model reads nothing else of a call (no ControlNet, patches or mask reach its layers), so NAG runs
every call with cond rows inside the window; other calls run the model's own ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..joint_attention import QKV, Attend
from ..params import NagParams
from ..webui.conditioning import crossattn
from ..webui.family import FORGE, ModelFamily
from ..webui.forge_patcher import RowsOf
from ..webui.passes import Forward, OnCall
from .neo_single_stream import Anatomy, BlockCall
from .runner import Runner, RunnerPass, patched_forward

Modulation = list[torch.Tensor]  # shift, scale, gate before the attention; shift, scale, gate before the MLP: [rows, 1, D]


def _ids(rows: int, text_tokens: int, grid: tuple[int, int], rope_options: dict | None, device: torch.device) -> torch.Tensor:
    """The model's position ids of ``[image; text]`` with ``text_tokens`` text tokens: ``[rows, N + L, 3]``."""
    height, width = grid
    text = torch.zeros((rows, text_tokens, 3), device=device, dtype=torch.float32)
    text[:, :, 0] = torch.linspace(0, text_tokens - 1, steps=text_tokens, device=device, dtype=torch.float32)
    options = rope_options if rope_options is not None else {}
    index = float(text_tokens) + options.get("shift_t", 0.0)
    extents = ((float(height) - 1.0) * options.get("scale_y", 1.0) + 1.0, (float(width) - 1.0) * options.get("scale_x", 1.0) + 1.0)
    offsets = (options.get("shift_y", 0.0), options.get("shift_x", 0.0))
    image = torch.zeros((height, width, 3), device=device, dtype=torch.float32)
    image[:, :, 0] = index
    for axis, offset, extent, steps in zip((1, 2), offsets, extents, grid, strict=True):
        positions = torch.linspace(offset, extent - 1 + offset, steps=steps, device=device, dtype=torch.float32)
        image[:, :, axis] = positions.unsqueeze(1) if axis == 1 else positions.unsqueeze(0)
    return torch.cat([image.view(1, height * width, 3).expand(rows, -1, -1), text], dim=1)


def _modulated(x: torch.Tensor, norm: torch.nn.Module, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The host's modulation, in float32 and back to the stream's dtype."""
    return (norm(x).float() * (1 + scale.float()) + shift.float()).to(x.dtype)


def _gated(x: torch.Tensor, gate: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """The host's gated residual, in float32 and back to the stream's dtype."""
    return x + (gate.float() * update.float()).to(x.dtype)


def _attend(host: Any, heads: int) -> Attend:
    """The host's RoPE (``apply_rope_split_half`` on ``[B, S, H, Dh]``) and attention (heads merged)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
        batch, _, tokens, _ = q.shape
        q, k = host.ck.apply_rope_split_half(q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), pe)
        merged = (t.reshape(batch, tokens, -1) for t in (q, k, v.transpose(1, 2)))
        return host.attention_function(*merged, heads, mask=None)

    return attend


def _qkv(attention: torch.nn.Module, x: torch.Tensor) -> QKV:
    """q, k (per-head RMS norm, before the RoPE) and v of ``ErnieImageAttention``, ``[B, H, S, Dh]``."""
    batch, tokens, _ = x.shape

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.view(batch, tokens, attention.heads, attention.head_dim)

    q, k = attention.norm_q(heads(attention.to_q(x))), attention.norm_k(heads(attention.to_k(x)))
    return QKV(q.transpose(1, 2), k.transpose(1, 2), heads(attention.to_v(x)).transpose(1, 2))


def _layer(
    layer: torch.nn.Module, streams: tuple[torch.Tensor, torch.Tensor], temb: tuple[Modulation, Modulation], call: BlockCall
) -> tuple[torch.Tensor, torch.Tensor]:
    """``ErnieImageSharedAdaLNBlock`` on the batch and on the NAG rows' text (with their positive rows'
    modulation): attention with NAG, then each its own out-projection, gates and MLP."""
    attention = layer.self_attention
    normed = [_modulated(x, layer.adaLN_sa_ln, scale=m[1], shift=m[0]) for x, m in zip(streams, temb, strict=True)]
    outs = call.attention(_qkv(attention, normed[0]), _qkv(attention, normed[1]))
    updated = []
    for x, out, (_, _, gate_msa, shift_mlp, scale_mlp, gate_mlp) in zip(streams, outs, temb, strict=True):
        x = _gated(x, gate_msa, attention.to_out[0](out))
        updated.append(_gated(x, gate_mlp, layer.mlp(_modulated(x, layer.adaLN_mlp_ln, scale_mlp, shift_mlp))))
    return updated[0], updated[1]


class _NagRunner(Runner):
    """The guided ``forward`` of one ``ErnieImageModel`` (the host: comfy_kitchen as ``ck``, the attention function)."""

    def text(self, context: torch.Tensor) -> torch.Tensor:
        projection = self.model.text_proj
        return projection(context) if projection is not None and context.numel() > 0 else context

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The host's ``forward(x, timesteps, context, **kwargs)`` (``transformer_options`` among them)."""
        model = self.model
        positive = self.rows_of(x, context, kwargs)
        if positive is None:
            return type(model).forward(model, x, timesteps, context, **kwargs)
        batch, _, height, width = x.shape
        patch = model.patch_size
        grid = (height // patch, width // patch)
        text = self.text(context)
        text_negative = self.text(positive.negatives(crossattn(self.negative()).to(context)))  # on the call's device before indexing
        rope_options = (kwargs.get("transformer_options") or {}).get("rope_options")
        c = model.time_embedding(model.time_proj(timesteps).to(x.dtype))
        temb = [t.unsqueeze(1).contiguous() for t in model.adaLN_modulation(c).chunk(6, dim=-1)]
        call = BlockCall(
            positive,
            text.shape[1],
            False,  # image first
            model.pos_embed(_ids(batch, text.shape[1], grid, rope_options, x.device)),
            model.pos_embed(_ids(len(positive), text_negative.shape[1], grid, rope_options, x.device)),
            _attend(self.host, model.num_heads),
            self.params,
        )
        streams = (torch.cat([model.x_embedder(x), text], dim=1), text_negative)
        modulations = (temb, [positive.take(t) for t in temb])  # the NAG rows': their positive rows' time
        for layer in model.layers:
            streams = _layer(layer, streams, modulations, call)
        hidden = model.final_norm(streams[0], c).type_as(streams[0])
        patches = model.final_linear(hidden)[:, : grid[0] * grid[1], :]
        self.told(True, "")
        out = patches.view(batch, *grid, patch, patch, model.out_channels).permute(0, 5, 1, 3, 2, 4)
        return out.contiguous().view(batch, model.out_channels, height, width)


def nag_forward(
    model: torch.nn.Module, negative: Callable[[], Any], params: NagParams, rows_of: RowsOf, on_call: OnCall | None = None
) -> Forward:
    """A replacement for the ``ErnieImageModel``'s ``forward`` that guides the positive rows with NAG
    (see ``runner.Runner``); ``negative()`` is ``[images, tokens, 3072]``."""
    return patched_forward(_NagRunner(model, negative, params, rows_of, on_call).forward)


ANATOMY = Anatomy(
    "ERNIE-Image",
    "ErnieImageModel",
    model=("x_embedder", "text_proj", "time_proj", "time_embedding", "pos_embed", "adaLN_modulation", "final_norm", "final_linear"),
    blocks="layers",
    block=(
        "adaLN_sa_ln", "adaLN_mlp_ln", "mlp", "self_attention.to_q", "self_attention.to_k", "self_attention.to_v", "self_attention.norm_q",
        "self_attention.norm_k", "self_attention.to_out", "self_attention.heads", "self_attention.head_dim",
    ),
    host=("ck.apply_rope_split_half", "attention_function"),
)  # fmt: skip


class ErniePass(RunnerPass):
    """NAG on an ERNIE-Image model for one sampling pass."""

    runner = _NagRunner

    def hooked_text(self, model: torch.nn.Module) -> str:
        return f"{len(model.layers)} single-stream layers"


FAMILY = ModelFamily(ANATOMY.family, {FORGE: ErniePass}, ANATOMY.recognises, ANATOMY.unsupported)
