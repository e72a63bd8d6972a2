"""NAG for Flux.1 and Chroma on Forge (``backend/nn/flux.py`` and ``backend/nn/chroma.py``, read at
Forge main dfdcbab6), as the authors' ComfyUI-NAG does it (see ``lib_nag.joint_attention``).

``nag_forward`` builds a replacement for the diffusion model's ``forward``. When a call's batch has
cond chunks and NAG is active, it runs the model's forward itself with one NAG row per positive row
(text: the NAG negative prompt; Flux's pooled vector: the NAG negative's; time, guidance and Chroma's
modulations: the positive row's), calling the host's own block modules' submodules (so quantized and
LoRA weights work) and the host's attention. Otherwise it calls the model's own forward. Rows that
are not positive get exactly what the host computes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..attention import PositiveRows
from ..joint_attention import QKV, Attend, double_stream_attention, single_stream_attention
from ..params import NagParams
from . import webui
from .forge import positive_rows

FORWARD = "diffusion_model.forward"  # the object patch NAG adds to the pass's clone of the patcher
NAG_FORWARD = "_nag_forward"  # marks the forward ``nag_forward`` builds

Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # shift, scale, gate: [B, 1, D] each
DoubleModulations = tuple[Modulation, Modulation]  # before the attention, before the MLP
Forward = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class _Call:
    """What every block of one guided call needs."""

    positive: PositiveRows
    pe: torch.Tensor
    pe_negative: torch.Tensor
    attend: Attend
    fp16_fix: Callable[[torch.Tensor], torch.Tensor]
    params: NagParams


def _modulated(x: torch.Tensor, norm: torch.nn.Module, modulation: Modulation) -> torch.Tensor:
    shift, scale, _ = modulation
    return (1 + scale) * norm(x) + shift


def _heads(qkv: torch.Tensor, heads: int) -> QKV:
    """``[B, L, 3·H·Dh]`` → q, k, v ``[B, H, L, Dh]``, as the host's blocks split them."""
    batch, tokens, _ = qkv.shape
    return QKV(*qkv.view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4))


def _normed(qkv: QKV, norm: torch.nn.Module) -> QKV:
    q, k = norm(qkv.q, qkv.k, qkv.v)
    return QKV(q, k, qkv.v)


def _stream_qkv(block: torch.nn.Module, stream: str, x: torch.Tensor, modulation: Modulation) -> QKV:
    """q, k, v of one stream (``img`` or ``txt``) of a double-stream block."""
    attn = getattr(block, f"{stream}_attn")
    return _normed(_heads(attn.qkv(_modulated(x, getattr(block, f"{stream}_norm1"), modulation)), block.num_heads), attn.norm)


def _stream_update(
    block: torch.nn.Module, stream: str, x: torch.Tensor, attn_out: torch.Tensor, modulations: DoubleModulations
) -> torch.Tensor:
    """The residual updates of one stream of a double-stream block: attention, then MLP."""
    first, second = modulations
    x = x + first[2] * getattr(block, f"{stream}_attn").proj(attn_out)
    return x + second[2] * getattr(block, f"{stream}_mlp")(_modulated(x, getattr(block, f"{stream}_norm2"), second))


def _double_block(
    block: torch.nn.Module,
    streams: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    modulations: tuple[DoubleModulations, DoubleModulations, DoubleModulations],
    call: _Call,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``DoubleStreamBlock`` on the image, text and NAG text streams; the NAG text attends with the
    positive rows' image q/k/v, and only the positive rows' image stream receives guidance."""
    img, txt, txt_negative = streams
    img_mods, txt_mods, txt_negative_mods = modulations
    txt_out, txt_negative_out, img_out = double_stream_attention(
        _stream_qkv(block, "txt", txt, txt_mods[0]),
        _stream_qkv(block, "txt", txt_negative, txt_negative_mods[0]),
        _stream_qkv(block, "img", img, img_mods[0]),
        call.positive,
        call.pe,
        call.pe_negative,
        call.attend,
        call.params,
    )
    return (
        _stream_update(block, "img", img, img_out, img_mods),
        call.fp16_fix(_stream_update(block, "txt", txt, txt_out, txt_mods)),
        call.fp16_fix(_stream_update(block, "txt", txt_negative, txt_negative_out, txt_negative_mods)),
    )


def _single_inputs(block: torch.nn.Module, x: torch.Tensor, modulation: Modulation) -> tuple[QKV, torch.Tensor]:
    qkv, mlp = torch.split(block.linear1(_modulated(x, block.pre_norm, modulation)), [3 * block.hidden_size, block.mlp_hidden_dim], dim=-1)
    return _normed(_heads(qkv, block.num_heads), block.norm), mlp


def _single_output(
    block: torch.nn.Module, x: torch.Tensor, attn_out: torch.Tensor, mlp: torch.Tensor, modulation: Modulation
) -> torch.Tensor:
    return x + modulation[2] * block.linear2(torch.cat((attn_out, block.mlp_act(mlp)), dim=2))


def _single_block(
    block: torch.nn.Module,
    streams: tuple[torch.Tensor, torch.Tensor],
    txt_lengths: tuple[int, int],
    modulations: tuple[Modulation, Modulation],
    call: _Call,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``SingleStreamBlock`` on the batch and the NAG rows (``[text; image]`` tokens each): both
    get the guided image attention output, each keeps its own MLP half and gate."""
    (x, x_negative), (modulation, modulation_negative) = streams, modulations
    qkv, mlp = _single_inputs(block, x, modulation)
    qkv_negative, mlp_negative = _single_inputs(block, x_negative, modulation_negative)
    out, out_negative = single_stream_attention(
        qkv, qkv_negative, *txt_lengths, call.positive, call.pe, call.pe_negative, call.attend, call.params
    )
    return (
        call.fp16_fix(_single_output(block, x, out, mlp, modulation)),
        call.fp16_fix(_single_output(block, x_negative, out_negative, mlp_negative, modulation_negative)),
    )


class _Modulations(Protocol):
    """Per-block modulations of the batch and of the NAG rows; the image stream and the final layer
    use the batch's only."""

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]: ...

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]: ...

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor: ...


def _halves(six: tuple[torch.Tensor, ...]) -> DoubleModulations:
    return six[:3], six[3:]


@dataclass(frozen=True)
class _FluxModulations:
    """Flux: each block's modulation layers on ``vec`` (batch) and ``vec_negative`` (NAG rows)."""

    vec: torch.Tensor
    vec_negative: torch.Tensor

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]:
        return _halves(block.img_mod(self.vec)), _halves(block.txt_mod(self.vec)), _halves(block.txt_mod(self.vec_negative))

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]:
        return block.modulation(self.vec), block.modulation(self.vec_negative)

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
        return model.final_layer(img, self.vec)


def _triple(modulation: Any) -> Modulation:
    return modulation.shift, modulation.scale, modulation.gate


@dataclass(frozen=True)
class _ChromaModulations:
    """Chroma: ``distribute_modulations`` of the batch's modulation vectors and of the NAG rows'
    (the positive rows' own: Chroma's modulations carry no prompt)."""

    batch: dict[str, Any]
    negative: dict[str, Any]

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]:
        img, txt = f"double_blocks.{index}.img_mod.lin", f"double_blocks.{index}.txt_mod.lin"
        return tuple(tuple(_triple(m) for m in pair) for pair in (self.batch[img], self.batch[txt], self.negative[txt]))

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]:
        key = f"single_blocks.{index}.modulation.lin"
        return _triple(self.batch[key]), _triple(self.negative[key])

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
        return model.final_layer(img, self.batch["final_layer.adaLN_modulation.1"])


def _blocks(
    model: torch.nn.Module, img: torch.Tensor, txt: torch.Tensor, txt_negative: torch.Tensor, modulations: _Modulations, call: _Call
) -> torch.Tensor:
    """Both stacks and the final layer; the NAG rows' image stream starts the single stack as a copy
    of their positive rows', and is dropped at the end with the NAG rows."""
    streams = (img, txt, txt_negative)
    for index, block in enumerate(model.double_blocks):
        streams = _double_block(block, streams, modulations.double(index, block), call)
    img, txt, txt_negative = streams
    txt_lengths = (txt.shape[1], txt_negative.shape[1])
    pair = (torch.cat((txt, img), 1), torch.cat((txt_negative, call.positive.take(img)), 1))
    for index, block in enumerate(model.single_blocks):
        pair = _single_block(block, pair, txt_lengths, modulations.single(index, block), call)
    return modulations.final(model, pair[0][:, txt_lengths[0] :, ...])


@dataclass(frozen=True)
class _Inputs:
    """One call's inputs that the modulations read."""

    positive: PositiveRows
    timestep: torch.Tensor
    y: torch.Tensor | None
    guidance: torch.Tensor | None
    rows: int
    device: torch.device
    dtype: torch.dtype


def _flux_modulations(model: torch.nn.Module, host: Any, call_inputs: _Inputs, y_negative: torch.Tensor) -> _Modulations:
    """Forge's Flux ``vec``: time (and guidance) embedding plus the pooled vector's; the NAG rows take
    their positive rows' time and guidance and the NAG negative's pooled vector."""
    dtype = call_inputs.dtype
    vec = model.time_in(host.timestep_embedding(call_inputs.timestep, 256).to(dtype))
    if model.guidance_embed:
        if call_inputs.guidance is None:
            raise ValueError("Didn't get guidance strength for guidance distilled model.")
        vec = vec + model.guidance_in(host.timestep_embedding(call_inputs.guidance, 256).to(dtype))
    vec_negative = call_inputs.positive.take(vec) + model.vector_in(y_negative)
    return _FluxModulations(vec + model.vector_in(call_inputs.y), vec_negative)


def _chroma_modulations(model: torch.nn.Module, host: Any, call_inputs: _Inputs) -> _Modulations:
    """Forge's Chroma modulation vectors (time, zero guidance and block index through the distilled
    guidance layer), distributed for the batch and for the NAG rows."""
    device, dtype, timestep = call_inputs.device, call_inputs.dtype, call_inputs.timestep
    length = len(model.double_blocks) * 12 + len(model.single_blocks) * 3 + 2
    distill_timestep = host.timestep_embedding(timestep.detach().clone(), 16).to(device=device, dtype=dtype)
    distil_guidance = host.timestep_embedding(torch.zeros_like(timestep), 16).to(device=device, dtype=dtype)
    index = host.timestep_embedding(torch.arange(length), 32).to(device=device, dtype=dtype).unsqueeze(0).repeat(call_inputs.rows, 1, 1)
    timestep_guidance = torch.cat([distill_timestep, distil_guidance], dim=1).unsqueeze(1).repeat(1, length, 1)
    vectors = model.distilled_guidance_layer(torch.cat([timestep_guidance, index], dim=-1))
    counts = (len(model.single_blocks), len(model.double_blocks))
    return _ChromaModulations(
        model.distribute_modulations(vectors, *counts), model.distribute_modulations(call_inputs.positive.take(vectors), *counts)
    )


def _patches(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forge's forward before ``inner_forward``: circular pad to even sizes, 2×2 patches
    ``[B, h/2·w/2, C·4]``, and their ids ``[B, L, 3]`` (0, row, column) in x's dtype."""
    batch, channels, height, width = x.shape
    x = torch.nn.functional.pad(x, (0, width % 2, 0, height % 2), mode="circular")
    rows, columns = (height + 1) // 2, (width + 1) // 2
    img = x.view(batch, channels, rows, 2, columns, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, channels * 4)
    ids = torch.zeros((rows, columns, 3), device=x.device, dtype=x.dtype)
    ids[..., 1] = ids[..., 1] + torch.linspace(0, rows - 1, steps=rows, device=x.device, dtype=x.dtype)[:, None]
    ids[..., 2] = ids[..., 2] + torch.linspace(0, columns - 1, steps=columns, device=x.device, dtype=x.dtype)[None, :]
    return img, ids.view(1, rows * columns, 3).expand(batch, -1, -1)


def _image(out: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Patches back to ``[B, C, height, width]``, the padding cut."""
    batch, _, channels = out.shape
    rows, columns = (height + 1) // 2, (width + 1) // 2
    image = (
        out.view(batch, rows, columns, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(batch, channels // 4, rows * 2, columns * 2)
    )
    return image[:, :, :height, :width]


def _text_ids(rows: int, tokens: int, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros((rows, tokens, 3), device=like.device, dtype=like.dtype)


def _flux_conditioning(y: torch.Tensor, guidance: torch.Tensor | None = None, **_: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Flux's ``forward(x, timestep, context, y, guidance=None, **kwargs)`` arguments after context."""
    return y, guidance


def nag_forward(
    model: torch.nn.Module,
    negative: Callable[[], torch.Tensor | dict[str, torch.Tensor]],
    params: NagParams,
    is_active: Callable[[dict], bool],
    on_guided: Callable[[bool], None] | None = None,
) -> Forward:
    """A replacement for ``model.forward`` (a Forge ``IntegratedFluxTransformer2DModel`` or
    ``IntegratedChromaTransformer2DModel``) that guides the cond rows with NAG.

    ``negative()`` is the NAG negative now, one row per image of the batch: for Flux the conditioning
    dict (``crossattn [images, tokens, T5]``, ``vector [images, pooled]``), for Chroma the T5 tensor.
    ``is_active(transformer_options)`` says whether NAG guides this call (the step window); when it
    is false, or the call has no cond chunk, the model's own forward runs. The call's rows are
    placed from ``cond_or_uncond`` as on the UNet path (whole copies of the batch too); ``on_guided``
    is told, for each active call, whether its rows could be placed (then they were guided).
    """
    host = sys.modules[type(model).__module__]
    is_chroma = hasattr(model, "distribute_modulations")
    own_forward = type(model).forward

    def forward(x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        options = kwargs.get("transformer_options") or {}
        if not is_active(options):
            return own_forward(model, x, timestep, context, *args, **kwargs)
        placed, positive = positive_rows(x, context, options)
        if positive is None:
            if on_guided is not None and not placed:
                on_guided(False)
            return own_forward(model, x, timestep, context, *args, **kwargs)
        img, img_ids = _patches(x)
        img = model.img_in(img)
        y, guidance = (None, None) if is_chroma else _flux_conditioning(*args, **kwargs)
        inputs = _Inputs(positive, timestep, y, guidance, x.shape[0], img.device, img.dtype)
        conditioning = negative()
        if is_chroma:
            modulations, context_negative = _chroma_modulations(model, host, inputs), webui.crossattn(conditioning)
        else:
            modulations = _flux_modulations(model, host, inputs, positive.negatives(conditioning["vector"].to(y)))
            context_negative = conditioning["crossattn"]
        txt_negative = positive.negatives(context_negative.to(context))  # on the call's device before indexing
        call = _Call(
            positive,
            model.pe_embedder(torch.cat((_text_ids(x.shape[0], context.shape[1], x), img_ids), dim=1)),
            model.pe_embedder(torch.cat((_text_ids(len(positive), txt_negative.shape[1], x), positive.take(img_ids)), dim=1)),
            host.attention,
            host.fp16_fix,
            params,
        )
        out = _blocks(model, img, model.txt_in(context), model.txt_in(txt_negative), modulations, call)
        if on_guided is not None:
            on_guided(True)
        return _image(out, x.shape[2], x.shape[3])

    setattr(forward, NAG_FORWARD, True)
    return forward


def neighbours_forward(model: torch.nn.Module, patcher: Any) -> bool:
    """Whether another extension replaces the model's forward: an object patch, or an instance
    forward that is neither NAG's (an earlier pass's patcher still loaded) nor the model's own bound
    forward (which Forge's unpatch sets back as an instance attribute)."""
    for forward in (getattr(patcher, "object_patches", {}).get(FORWARD), vars(model).get("forward")):
        own = getattr(forward, "__func__", None) is type(model).forward and forward.__self__ is model
        if forward is not None and not own and not getattr(forward, NAG_FORWARD, False):
            return True
    return False


def is_joint_transformer(model: Any) -> bool:
    """A Flux-like model: double- and single-stream block stacks."""
    return all(hasattr(model, name) for name in ("double_blocks", "single_blocks", "txt_in", "img_in"))


def is_flux_family(model: Any) -> bool:
    """Flux.1 or Chroma as Forge main builds them (``inner_forward``; Neo's ComfyUI port has
    ``forward_orig`` and other block signatures, which ``nag_forward`` does not run)."""
    return is_joint_transformer(model) and hasattr(model, "inner_forward") and not hasattr(model, "forward_orig")


class ModelCalls:
    """The guidance state of a pass that runs the whole model: the NAG negative now, and the model
    calls guided, or whose rows could not be placed."""

    def __init__(self) -> None:
        self.negative: Any = None
        self.guided_calls = 0
        self.missed_calls = 0

    def count(self, report: webui.PassReport) -> Callable[[bool], None]:
        def counted(placed: bool) -> None:
            report.count_call(placed, placed)
            self.guided_calls += placed

        return counted


class FluxPass(webui.NagPass):
    """NAG on a Flux or Chroma model for one sampling pass. The pass clones the UNet patcher and
    adds an object patch that replaces the diffusion model's ``forward`` with ``nag_forward``: Forge
    sets it when it loads the patcher for sampling and restores what was there when it unloads it,
    so nothing stays on the model. Between the window's steps the patched forward is the model's."""

    def __init__(self, job: webui.NagJob, report: webui.PassReport) -> None:
        self.active = False
        self.patched: list[tuple[Any, Any, Any]] = []  # (sd_model, our clone, the patcher it replaced)
        report.unit = "model calls"
        super().__init__(job, report)

    def make_nag(self) -> ModelCalls:
        return ModelCalls()

    def negative_from(self, cond: Any) -> Any:
        return cond  # Flux needs the pooled vector too

    def hook(self, sd_model: Any) -> bool:
        original = sd_model.forge_objects.unet
        model = original.model.diffusion_model
        if neighbours_forward(model, original):
            self.report.skipped = f"another extension replaces the {type(model).__name__} forward, which NAG would have to run"
            return False
        clone = original.clone()
        negative, active = (lambda: self.nag.negative), (lambda _options: self.active)
        clone.add_object_patch(FORWARD, nag_forward(model, negative, self.params, active, self.nag.count(self.report)))
        sd_model.forge_objects.unet = clone
        self.patched.append((sd_model, clone, original))
        self.report.hooked = f"{len(model.double_blocks)} double + {len(model.single_blocks)} single blocks"
        return True

    def unhook(self) -> None:
        self.active = False

    def close(self) -> None:
        super().close()
        for sd_model, clone, original in self.patched:
            if sd_model.forge_objects.unet is clone:
                sd_model.forge_objects.unet = original
        self.patched = []

    def on_step(self, params: Any, denoiser: Any, active: bool) -> None:
        self.active = active
