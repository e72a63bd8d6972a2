"""The MMDiT family: NAG for SD3 and SD3.5, on both hosts' model code: A1111 1.10.1's
``modules/models/sd3/mmdit.py`` ``MMDiT`` (SD3 Medium; read at 82a973c0) and Forge main's
``backend/nn/mmditx.py`` ``MMDiTX`` (SD3.5 Large, Large Turbo and Medium; read at dfdcbab6). Both
descend from Stability AI's reference and share its names and order of operations.

``nag_forward`` builds a replacement for the model's ``forward``. For a call with positive rows it
runs the forward itself with one NAG row per positive row, as the authors' ComfyUI-NAG
(``sd3/mmdit.py`` @ ef8a641) does: the NAG row's adaLN vector is its positive row's timestep
embedding plus ``y_embedder`` of the NAG negative's pooled vector; its context is the NAG negative's,
through ``context_embedder``; in each joint block (``lib_nag.joint_attention``: text = the context
stream, image = the x stream, no rotary embedding) the NAG context attends, with its own modulation,
over itself and the positive rows' image q/k/v; the positive rows' image attention output is guided
before ``x_block``'s projection, and the NAG context stream is updated by its own ``post_attention``
(until the last, ``pre_only``, block). The image stream, SD3.5 Medium's image self-attention
(``attn2``) and the final layer run on the batch only. The host's own submodules and attention
function are called (quantized and LoRA weights work); rows that are not positive get exactly what
the host computes, and a call without positive rows runs the model's own ``forward``.

The switches between the hosts: Forge's MMDiT-X blocks (``x_block.x_block_self_attn``), its
``transformer_options["skip_layers"]`` (whole blocks skipped, the NAG stream's too), and a Forge
ControlNet (``control``), with which NAG stands aside. qk-norm (SD3.5) is inside ``pre_attention``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import PositiveRows
from ..joint_attention import QKV, Attend, double_stream_attention
from ..params import NagParams
from ..webui.a1111_rows import DenoiserPlacement, diffusion_model
from ..webui.family import A1111, FORGE, ModelFamily
from ..webui.forge_patcher import RowsOf
from ..webui.passes import Forward, Job, ModelPass, OnCall, foreign_method
from ..webui.report import PassReport
from .runner import Runner, RunnerPass, patched_forward

STOOD_ASIDE = "a ControlNet on the call, which NAG's own run of the blocks would leave out"

HostAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]  # [B, L, H·Dh] in and out
Streams = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]  # context, NAG context, image


def is_mmdit(model: Any) -> bool:
    """An SD3/SD3.5 MMDiT as A1111 or Forge builds it, without register tokens (no SD3 model has
    them; NAG's context stream would need them too)."""
    parts = ("joint_blocks", "x_embedder", "t_embedder", "context_embedder", "final_layer", "unpatchify")
    return all(hasattr(model, name) for name in parts) and getattr(model, "register_length", 0) == 0


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H·Dh]`` (or v's ``[B, L, H, Dh]``) → ``[B, H, L, Dh]``, as the host's attention views them."""
    return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _merged(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, Dh]`` → ``[B, L, H·Dh]``, what the host's ``block_mixing`` gives its attention."""
    return t.transpose(1, 2).reshape(t.shape[0], t.shape[2], -1)


def _qkv(qkv: tuple[torch.Tensor, torch.Tensor, torch.Tensor], heads: int) -> QKV:
    return QKV(*(_heads(t, heads) for t in qkv))


@dataclass(frozen=True)
class _Call:
    """What every joint block of one guided call needs."""

    positive: PositiveRows
    attention: HostAttention
    params: NagParams
    skip_layers: list[int]

    def attend(self, heads: int) -> Attend:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _pe: torch.Tensor | None) -> torch.Tensor:
            return self.attention(_merged(q), _merged(k), _merged(v), heads)

        return attend


def _pre_attention(block: torch.nn.Module, x: torch.Tensor, c: torch.Tensor) -> tuple[tuple, tuple | None, tuple]:
    """The image stream's q/k/v, those of an MMDiT-X block's ``attn2`` (else None) and what ``post_attention`` takes."""
    if getattr(block, "x_block_self_attn", False):
        return block.pre_attention_x(x, c)
    qkv, intermediates = block.pre_attention(x, c)
    return qkv, None, intermediates


def _post_attention(block: torch.nn.Module, attn: torch.Tensor, qkv2: tuple | None, intermediates: tuple, call: _Call) -> torch.Tensor:
    if qkv2 is None:
        return block.post_attention(attn, *intermediates)
    return block.post_attention_x(attn, call.attention(*qkv2, block.attn2.num_heads), *intermediates)


def _joint_block(block: torch.nn.Module, streams: Streams, vectors: tuple[torch.Tensor, torch.Tensor], call: _Call) -> Streams:
    """``block_mixing`` on the batch and the NAG context stream."""
    (context, context_negative, x), (c, c_negative) = streams, vectors
    context_block, x_block = block.context_block, block.x_block
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    negative_qkv, negative_intermediates = context_block.pre_attention(context_negative, c_negative)
    x_qkv, x_qkv2, x_intermediates = _pre_attention(x_block, x, c)
    heads = x_block.attn.num_heads
    context_attn, negative_attn, x_attn = double_stream_attention(
        _qkv(context_qkv, heads), _qkv(negative_qkv, heads), _qkv(x_qkv, heads), call.positive, None, None, call.attend(heads), call.params
    )
    x = _post_attention(x_block, x_attn, x_qkv2, x_intermediates, call)
    if context_block.pre_only:
        return None, None, x
    return (
        context_block.post_attention(context_attn, *context_intermediates),
        context_block.post_attention(negative_attn, *negative_intermediates),
        x,
    )


class _NagRunner(Runner):
    """The guided ``forward`` of one model."""

    def positive(self, x: torch.Tensor, context: torch.Tensor, kwargs: dict[str, Any]) -> PositiveRows | None:
        positive = self.rows_of(x, context, kwargs)
        if positive is not None and kwargs.get("control") is not None:
            self.told(False, STOOD_ASIDE)
            return None
        return positive

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None, context: torch.Tensor | None = None, **kwargs: Any
    ) -> torch.Tensor:
        """The host's ``forward(x, t, y=None, context=None[, control=None, transformer_options={}])``."""
        model = self.model
        positive = self.positive(x, context, kwargs)
        if positive is None:
            return type(model).forward(model, x, t, y, context, **kwargs)
        hw = x.shape[-2:]
        image = model.x_embedder(x) + model.cropped_pos_embed(hw).to(x.device, x.dtype)
        time = model.t_embedder(t, dtype=image.dtype)
        conditioning = self.negative()
        vectors = (time, positive.take(time))
        if y is not None:
            pooled_negative = positive.negatives(conditioning["vector"].to(y))  # on the call's device before indexing
            vectors = (time + model.y_embedder(y), vectors[1] + model.y_embedder(pooled_negative))
        context_negative = positive.negatives(conditioning["crossattn"].to(context))
        streams: Streams = (model.context_embedder(context), model.context_embedder(context_negative), image)
        call = _Call(positive, self.host.attention, self.params, (kwargs.get("transformer_options") or {}).get("skip_layers", []))
        for index, block in enumerate(model.joint_blocks):
            if index not in call.skip_layers:
                streams = _joint_block(block, streams, vectors, call)
        self.told(True, "")
        return model.unpatchify(model.final_layer(streams[2], vectors[0]), hw=hw)


def nag_forward(
    model: torch.nn.Module,
    negative: Callable[[], dict[str, torch.Tensor]],
    params: NagParams,
    rows_of: RowsOf,
    on_call: OnCall | None = None,
) -> Forward:
    """A replacement for the MMDiT's ``forward`` that guides the positive rows with NAG.

    ``negative()`` is the NAG negative now, one row per image of the batch: the conditioning dict
    (``crossattn [images, tokens, 4096]``, ``vector [images, 2048]``). ``rows_of(x, context,
    kwargs)`` gives the call's positive rows (``negative_index``: their image), or None, and then the
    model's own ``forward`` runs: A1111 gives them from its own placement, Forge from
    ``transformer_options`` (``forge_rows``). ``on_call`` is told, for each call that has positive
    rows, whether it was guided, and if not, why.
    """
    return patched_forward(_NagRunner(model, negative, params, rows_of, on_call).forward)


def _no_rows(*_call: Any) -> None:
    return None


def _joint_blocks(model: torch.nn.Module) -> str:
    return f"{len(model.joint_blocks)} joint blocks"


class ForgeMMDiTPass(RunnerPass):
    """NAG on an SD3.5 model in Forge for one sampling pass (the runner's forward as the object patch)."""

    runner = _NagRunner

    def hooked_text(self, model: torch.nn.Module) -> str:
        return _joint_blocks(model)


class A1111MMDiTPass(DenoiserPlacement, ModelPass):
    """NAG on A1111's SD3 for one sampling pass. A1111 has no object patches: the pass sets
    ``nag_forward`` as the MMDiT's instance ``forward`` and, at the end, sets back exactly what was
    there; the rows of each call come from the CFG batch as on the UNet path. NAG stands aside if
    another extension replaced the MMDiT's forward."""

    def __init__(self, job: Job, report: PassReport) -> None:
        self.patched: list[tuple[torch.nn.Module, Any, Any]] = []  # (model, NAG's forward, what was there)
        super().__init__(job, report)

    def hook(self, sd_model: Any) -> bool:
        model = diffusion_model(sd_model)
        if foreign_method(model, "forward"):
            self.report.skipped = f"another extension replaces the {type(model).__name__} forward, which NAG would have to run"
            return False
        self.place_model_calls(model)
        negative = self.weak(lambda nag_pass: nag_pass.nag.negative)
        rows = self.weak(lambda nag_pass: nag_pass.rows_of)
        forward = nag_forward(model, negative, self.params, lambda *call: (rows() or _no_rows)(*call), self.nag.count(self.report))
        self.patched.append((model, forward, vars(model).get("forward")))
        model.forward = forward
        self.report.hooked = _joint_blocks(model)
        return True

    def unhook(self) -> None:
        self.remove_handles()
        for model, forward, before in self.patched:
            if vars(model).get("forward") is forward:  # never what another extension set since
                if before is None:
                    del model.forward
                else:
                    model.forward = before
        self.patched = []

    def rows_of(self, x: torch.Tensor, _context: torch.Tensor, _kwargs: dict[str, Any]) -> PositiveRows | None:
        """The positive rows of an MMDiT call inside the window, placed as on the UNet path."""
        call = self.unet_call
        if self.layout is None or not self.layout.active:
            return None
        if call is None or not call.placed or x.shape[0] != call.rows:
            self.nag.count(self.report)(False, "")
            return None
        return call.positive


FAMILY = ModelFamily("MMDiT", {A1111: A1111MMDiTPass, FORGE: ForgeMMDiTPass}, is_mmdit)
