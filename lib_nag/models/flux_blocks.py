"""The Flux block stacks with NAG rows, as the authors' ComfyUI-NAG runs them (see
``lib_nag.joint_attention``), for every Flux-shaped model: Forge main's and Neo's Flux.1 and Chroma, and
Neo's Flux.2.

``blocks`` runs the double-stream blocks on the image, text and NAG text streams, then the
single-stream blocks on the batch and the NAG rows, then the final layer, calling the host's own
block submodules (so quantized and LoRA weights work), attention and modulation arithmetic. The
per-block modulations come from a ``Modulations`` object: Flux's modulation layers on ``vec``, where
the NAG rows take the NAG negative's pooled vector, or Chroma's distributed modulation vectors and
Flux.2's global modulations (``models.flux2``), which carry no prompt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..attention import PositiveRows
from ..joint_attention import QKV, Attend, double_stream_attention, single_stream_attention, single_stream_text_attention
from ..params import NagParams

Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # shift, scale, gate: [B, 1, D] each
DoubleModulations = tuple[Modulation, Modulation]  # before the attention, before the MLP
ApplyMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (normed x, 1 + scale, shift)


@dataclass(frozen=True)
class BlockCall:
    """What every block of one guided call needs."""

    positive: PositiveRows
    pe: torch.Tensor
    pe_negative: torch.Tensor
    attend: Attend
    fp16_fix: Callable[[torch.Tensor], torch.Tensor]
    params: NagParams
    apply_mod: ApplyMod  # the host's modulation arithmetic
    image_before_single_stack: Callable[[torch.Tensor], torch.Tensor]  # Neo fp16-fixes it, Forge main does not

    def modulated(self, x: torch.Tensor, norm: torch.nn.Module, modulation: Modulation) -> torch.Tensor:
        shift, scale, _ = modulation
        return self.apply_mod(norm(x), 1 + scale, shift)


def scale_and_shift(normed: torch.Tensor, scale_plus_one: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Forge main's modulation, ``(1 + scale) * norm(x) + shift`` (Neo's ``apply_mod`` is one ``addcmul``)."""
    return scale_plus_one * normed + shift


def unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def _heads(qkv: torch.Tensor, heads: int) -> QKV:
    """``[B, L, 3·H·Dh]`` → q, k, v ``[B, H, L, Dh]``, as the host's blocks split them."""
    batch, tokens, _ = qkv.shape
    return QKV(*qkv.view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4))


def _normed(qkv: QKV, norm: torch.nn.Module) -> QKV:
    q, k = norm(qkv.q, qkv.k, qkv.v)
    return QKV(q, k, qkv.v)


def _stream_qkv(block: torch.nn.Module, stream: str, x: torch.Tensor, modulation: Modulation, call: BlockCall) -> QKV:
    """q, k, v of one stream (``img`` or ``txt``) of a double-stream block."""
    attn = getattr(block, f"{stream}_attn")
    return _normed(_heads(attn.qkv(call.modulated(x, getattr(block, f"{stream}_norm1"), modulation)), block.num_heads), attn.norm)


def _stream_update(
    block: torch.nn.Module, stream: str, x: torch.Tensor, attn_out: torch.Tensor, modulations: DoubleModulations, call: BlockCall
) -> torch.Tensor:
    """The residual updates of one stream of a double-stream block: attention, then MLP (new tensors,
    where Neo adds in place: the values are the same)."""
    first, second = modulations
    x = x + first[2] * getattr(block, f"{stream}_attn").proj(attn_out)
    return x + second[2] * getattr(block, f"{stream}_mlp")(call.modulated(x, getattr(block, f"{stream}_norm2"), second))


def _double_block(
    block: torch.nn.Module,
    streams: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    modulations: tuple[DoubleModulations, DoubleModulations, DoubleModulations],
    call: BlockCall,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A ``DoubleStreamBlock`` on the image, text and NAG text streams; the NAG text attends with the
    positive rows' image q/k/v, and only the positive rows' image stream receives guidance."""
    img, txt, txt_negative = streams
    img_mods, txt_mods, txt_negative_mods = modulations
    txt_out, txt_negative_out, img_out = double_stream_attention(
        _stream_qkv(block, "txt", txt, txt_mods[0], call),
        _stream_qkv(block, "txt", txt_negative, txt_negative_mods[0], call),
        _stream_qkv(block, "img", img, img_mods[0], call),
        call.positive,
        call.pe,
        call.pe_negative,
        call.attend,
        call.params,
    )
    return (
        _stream_update(block, "img", img, img_out, img_mods, call),
        call.fp16_fix(_stream_update(block, "txt", txt, txt_out, txt_mods, call)),
        call.fp16_fix(_stream_update(block, "txt", txt_negative, txt_negative_out, txt_negative_mods, call)),
    )


def _single_inputs(block: torch.nn.Module, x: torch.Tensor, modulation: Modulation, call: BlockCall) -> tuple[QKV, torch.Tensor]:
    # Neo's gated MLPs (Flux.2) take twice the hidden width from ``linear1`` as ``linear2`` reads back.
    split = [3 * block.hidden_size, getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim)]
    qkv, mlp = torch.split(block.linear1(call.modulated(x, block.pre_norm, modulation)), split, dim=-1)
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
    call: BlockCall,
    text_alone: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``SingleStreamBlock`` on the batch (``[text; image]`` tokens) and the NAG rows: both get the
    guided image attention output, each keeps its own MLP half and gate. The NAG rows are
    ``[text; image]`` too, or, when their modulation is their positive rows' (``text_alone``), their
    text alone: their image tokens would be their positive rows', computed again."""
    (x, x_negative), (modulation, modulation_negative) = streams, modulations
    qkv, mlp = _single_inputs(block, x, modulation, call)
    qkv_negative, mlp_negative = _single_inputs(block, x_negative, modulation_negative, call)
    nag = call.positive, call.pe, call.pe_negative, call.attend, call.params
    if text_alone:
        out, out_negative = single_stream_text_attention(qkv, qkv_negative, txt_lengths[0], True, *nag)
    else:
        out, out_negative = single_stream_attention(qkv, qkv_negative, *txt_lengths, *nag)
    return (
        call.fp16_fix(_single_output(block, x, out, mlp, modulation)),
        call.fp16_fix(_single_output(block, x_negative, out_negative, mlp_negative, modulation_negative)),
    )


class Modulations(Protocol):
    """Per-block modulations of the batch and of the NAG rows; the image stream and the final layer
    use the batch's only. ``text_free``: the NAG rows' modulations are their positive rows'."""

    text_free: bool

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]: ...

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]: ...

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor: ...


def _triple(modulation: Any) -> Modulation:
    return modulation.shift, modulation.scale, modulation.gate


def _double_triples(*pairs: Any) -> tuple[DoubleModulations, ...]:
    """Pairs of ``ModulationOut`` (before the attention, before the MLP) as pairs of triples."""
    return tuple(tuple(_triple(modulation) for modulation in pair) for pair in pairs)


def triples(out: tuple) -> tuple[Modulation, ...]:
    """A ``Modulation`` layer's output as (shift, scale, gate) triples: Forge main's 6 or 3 tensors,
    or Neo's ``(ModulationOut, ModulationOut | None)``."""
    if isinstance(out[0], torch.Tensor):
        return tuple(tuple(out[start : start + 3]) for start in range(0, len(out), 3))
    return tuple(_triple(modulation) for modulation in out if modulation is not None)


@dataclass(frozen=True)
class FluxModulations:
    """Flux: each block's modulation layers on ``vec`` (batch) and ``vec_negative`` (NAG rows)."""

    vec: torch.Tensor
    vec_negative: torch.Tensor
    text_free = False  # the NAG rows' vec carries the NAG negative's pooled vector

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]:
        return triples(block.img_mod(self.vec)), triples(block.txt_mod(self.vec)), triples(block.txt_mod(self.vec_negative))

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]:
        return triples(block.modulation(self.vec))[0], triples(block.modulation(self.vec_negative))[0]

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
        return model.final_layer(img, self.vec)


@dataclass(frozen=True)
class ChromaModulations:
    """Chroma: ``distribute_modulations`` of the batch's modulation vectors and of the NAG rows'
    (the positive rows' own: Chroma's modulations carry no prompt)."""

    batch: dict[str, Any]
    negative: dict[str, Any]
    text_free = True

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]:
        img, txt = f"double_blocks.{index}.img_mod.lin", f"double_blocks.{index}.txt_mod.lin"
        return _double_triples(self.batch[img], self.batch[txt], self.negative[txt])

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]:
        key = f"single_blocks.{index}.modulation.lin"
        return _triple(self.batch[key]), _triple(self.negative[key])

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
        return model.final_layer(img, self.batch["final_layer.adaLN_modulation.1"])


@dataclass(frozen=True)
class NeoChromaModulations:
    """Neo's Chroma: ``get_modulations`` views of the batch's modulation vectors and of the NAG rows'
    (the positive rows' own)."""

    model: torch.nn.Module
    batch: torch.Tensor
    negative: torch.Tensor
    text_free = True

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]:
        get = self.model.get_modulations
        return _double_triples(
            get(self.batch, "double_img", idx=index), get(self.batch, "double_txt", idx=index), get(self.negative, "double_txt", idx=index)
        )

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]:
        batch, negative = (_triple(self.model.get_modulations(vectors, "single", idx=index)) for vectors in (self.batch, self.negative))
        return batch, negative

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
        return model.final_layer(img, model.get_modulations(self.batch, "final"))


def run_blocks(
    model: torch.nn.Module, img: torch.Tensor, txt: torch.Tensor, txt_negative: torch.Tensor, modulations: Modulations, call: BlockCall
) -> torch.Tensor:
    """Both stacks and the final layer. The NAG rows' image stream starts the single stack as a copy of
    their positive rows' (unless their modulation is their positive rows': then it would stay that copy,
    and the NAG rows are their text alone), and is dropped at the end with the NAG rows."""
    streams = (img, txt, txt_negative)
    for index, block in enumerate(model.double_blocks):
        streams = _double_block(block, streams, modulations.double(index, block), call)
    img, txt, txt_negative = streams
    img = call.image_before_single_stack(img)
    txt_lengths = (txt.shape[1], txt_negative.shape[1])
    text_alone = modulations.text_free
    pair = (torch.cat((txt, img), 1), txt_negative if text_alone else torch.cat((txt_negative, call.positive.take(img)), 1))
    for index, block in enumerate(model.single_blocks):
        pair = _single_block(block, pair, txt_lengths, modulations.single(index, block), call, text_alone)
    return modulations.final(model, pair[0][:, txt_lengths[0] :, ...])


@dataclass(frozen=True)
class Inputs:
    """One call's inputs that the modulations read."""

    positive: PositiveRows
    timestep: torch.Tensor
    y: torch.Tensor | None
    guidance: torch.Tensor | None
    rows: int
    device: torch.device
    dtype: torch.dtype


def flux_modulations(model: torch.nn.Module, host: Any, call_inputs: Inputs, y_negative: torch.Tensor) -> Modulations:
    """Forge's Flux ``vec``: time (and guidance) embedding plus the pooled vector's; the NAG rows take
    their positive rows' time and guidance and the NAG negative's pooled vector."""
    dtype = call_inputs.dtype
    vec = model.time_in(host.timestep_embedding(call_inputs.timestep, 256).to(dtype))
    if model.guidance_embed:
        if call_inputs.guidance is None:
            raise ValueError("Didn't get guidance strength for guidance distilled model.")
        vec = vec + model.guidance_in(host.timestep_embedding(call_inputs.guidance, 256).to(dtype))
    width = getattr(model, "vec_in_dim", None)  # Neo cuts the pooled vector to it
    vec_negative = call_inputs.positive.take(vec) + model.vector_in(y_negative[:, :width])
    return FluxModulations(vec + model.vector_in(call_inputs.y[:, :width]), vec_negative)


NEO_CHROMA_VECTORS = 344  # Neo's Chroma makes Chroma's 12·19 double + 3·38 single + 2 vectors whatever its depth


def chroma_modulations(model: torch.nn.Module, host: Any, call_inputs: Inputs) -> Modulations:
    """Chroma's modulation vectors (time, guidance: Forge main's zero, Neo's as given, and block index
    through the distilled guidance layer) for the batch and for the NAG rows: distributed (Forge main)
    or viewed through ``get_modulations`` (Neo)."""
    device, dtype, timestep = call_inputs.device, call_inputs.dtype, call_inputs.timestep
    is_neo = hasattr(model, "get_modulations")
    length = NEO_CHROMA_VECTORS if is_neo else len(model.double_blocks) * 12 + len(model.single_blocks) * 3 + 2
    guidance = torch.zeros_like(timestep) if call_inputs.guidance is None else call_inputs.guidance
    distill_timestep = host.timestep_embedding(timestep.detach().clone(), 16).to(device=device, dtype=dtype)
    distil_guidance = host.timestep_embedding(guidance.detach().clone(), 16).to(device=device, dtype=dtype)
    index = host.timestep_embedding(torch.arange(length), 32).to(device=device, dtype=dtype).unsqueeze(0).repeat(call_inputs.rows, 1, 1)
    timestep_guidance = torch.cat([distill_timestep, distil_guidance], dim=1).unsqueeze(1).repeat(1, length, 1)
    vectors = model.distilled_guidance_layer(torch.cat([timestep_guidance, index], dim=-1))
    if is_neo:
        return NeoChromaModulations(model, vectors, call_inputs.positive.take(vectors))
    counts = (len(model.single_blocks), len(model.double_blocks))
    return ChromaModulations(
        model.distribute_modulations(vectors, *counts), model.distribute_modulations(call_inputs.positive.take(vectors), *counts)
    )
