"""NAG for Flux.1 and Chroma on Forge (``backend/nn/flux.py`` and ``backend/nn/chroma.py``, read at
Forge main dfdcbab6) and for Flux.1, Flux.1 Kontext and Chroma on Forge Neo (its ComfyUI ports,
``backend/nn/flux.py`` read at 06d6af9a; ``backend/nn/chroma.py`` read in a copy of Neo v3.5,
exo101/sd-webui-forge-neo-v3 @ 5692d2d1), as the authors' ComfyUI-NAG does it (see
``lib_nag.joint_attention``).

``nag_forward`` builds a replacement for the diffusion model's entry point: Forge main's ``forward``,
or Neo's ``forward_orig`` (Neo's own ``forward`` then makes the patches, ids and Kontext reference
tokens and cuts the reference tokens from the output). When a call's batch has cond chunks and NAG
is active, it runs the blocks itself with one NAG row per positive row (text: the NAG negative
prompt; Flux's pooled vector: the NAG negative's; time, guidance and Chroma's modulations: the
positive row's), calling the host's own block modules' submodules (so quantized and LoRA weights
work), the host's attention and modulation arithmetic. Otherwise it calls the model's own entry
point. Rows that are not positive get exactly what the host computes.

Kontext's reference tokens are image-stream tokens, as in the authors' NAGFlux: the NAG rows reuse
their positive rows' reference q/k/v, the reference tokens' attention output is guided with the rest
of the image, and the host drops them at the end (``out[:, :img_tokens]``).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..attention import PositiveRows
from ..joint_attention import QKV, Attend, double_stream_attention, single_stream_attention
from ..params import NagParams
from . import webui
from .forge import ForgeModelPass, positive_rows
from .webui import NAG_FORWARD, OnCall

STOOD_ASIDE = "a ControlNet, attention mask or block patch on the call, which NAG's own run of the blocks would leave out"

Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # shift, scale, gate: [B, 1, D] each
DoubleModulations = tuple[Modulation, Modulation]  # before the attention, before the MLP
Forward = Callable[..., torch.Tensor]
ApplyMod = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (normed x, 1 + scale, shift)


@dataclass(frozen=True)
class _Call:
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


def _scale_and_shift(normed: torch.Tensor, scale_plus_one: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Forge main's modulation, ``(1 + scale) * norm(x) + shift`` (Neo's ``apply_mod`` is one ``addcmul``)."""
    return scale_plus_one * normed + shift


def _unchanged(x: torch.Tensor) -> torch.Tensor:
    return x


def _heads(qkv: torch.Tensor, heads: int) -> QKV:
    """``[B, L, 3·H·Dh]`` → q, k, v ``[B, H, L, Dh]``, as the host's blocks split them."""
    batch, tokens, _ = qkv.shape
    return QKV(*qkv.view(batch, tokens, 3, heads, -1).permute(2, 0, 3, 1, 4))


def _normed(qkv: QKV, norm: torch.nn.Module) -> QKV:
    q, k = norm(qkv.q, qkv.k, qkv.v)
    return QKV(q, k, qkv.v)


def _stream_qkv(block: torch.nn.Module, stream: str, x: torch.Tensor, modulation: Modulation, call: _Call) -> QKV:
    """q, k, v of one stream (``img`` or ``txt``) of a double-stream block."""
    attn = getattr(block, f"{stream}_attn")
    return _normed(_heads(attn.qkv(call.modulated(x, getattr(block, f"{stream}_norm1"), modulation)), block.num_heads), attn.norm)


def _stream_update(
    block: torch.nn.Module, stream: str, x: torch.Tensor, attn_out: torch.Tensor, modulations: DoubleModulations, call: _Call
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
    call: _Call,
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


def _single_inputs(block: torch.nn.Module, x: torch.Tensor, modulation: Modulation, call: _Call) -> tuple[QKV, torch.Tensor]:
    split = [3 * block.hidden_size, block.mlp_hidden_dim]
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
    call: _Call,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``SingleStreamBlock`` on the batch and the NAG rows (``[text; image]`` tokens each): both
    get the guided image attention output, each keeps its own MLP half and gate."""
    (x, x_negative), (modulation, modulation_negative) = streams, modulations
    qkv, mlp = _single_inputs(block, x, modulation, call)
    qkv_negative, mlp_negative = _single_inputs(block, x_negative, modulation_negative, call)
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


def _triple(modulation: Any) -> Modulation:
    return modulation.shift, modulation.scale, modulation.gate


def _double_triples(*pairs: Any) -> tuple[DoubleModulations, ...]:
    """Pairs of ``ModulationOut`` (before the attention, before the MLP) as pairs of triples."""
    return tuple(tuple(_triple(modulation) for modulation in pair) for pair in pairs)


def _triples(out: tuple) -> tuple[Modulation, ...]:
    """A ``Modulation`` layer's output as (shift, scale, gate) triples: Forge main's 6 or 3 tensors,
    or Neo's ``(ModulationOut, ModulationOut | None)``."""
    if isinstance(out[0], torch.Tensor):
        return tuple(tuple(out[start : start + 3]) for start in range(0, len(out), 3))
    return tuple(_triple(modulation) for modulation in out if modulation is not None)


@dataclass(frozen=True)
class _FluxModulations:
    """Flux: each block's modulation layers on ``vec`` (batch) and ``vec_negative`` (NAG rows)."""

    vec: torch.Tensor
    vec_negative: torch.Tensor

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]:
        return _triples(block.img_mod(self.vec)), _triples(block.txt_mod(self.vec)), _triples(block.txt_mod(self.vec_negative))

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]:
        return _triples(block.modulation(self.vec))[0], _triples(block.modulation(self.vec_negative))[0]

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
        return model.final_layer(img, self.vec)


@dataclass(frozen=True)
class _ChromaModulations:
    """Chroma: ``distribute_modulations`` of the batch's modulation vectors and of the NAG rows'
    (the positive rows' own: Chroma's modulations carry no prompt)."""

    batch: dict[str, Any]
    negative: dict[str, Any]

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]:
        img, txt = f"double_blocks.{index}.img_mod.lin", f"double_blocks.{index}.txt_mod.lin"
        return _double_triples(self.batch[img], self.batch[txt], self.negative[txt])

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]:
        key = f"single_blocks.{index}.modulation.lin"
        return _triple(self.batch[key]), _triple(self.negative[key])

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
        return model.final_layer(img, self.batch["final_layer.adaLN_modulation.1"])


@dataclass(frozen=True)
class _NeoChromaModulations:
    """Neo's Chroma: ``get_modulations`` views of the batch's modulation vectors and of the NAG rows'
    (the positive rows' own)."""

    model: torch.nn.Module
    batch: torch.Tensor
    negative: torch.Tensor

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


def _blocks(
    model: torch.nn.Module, img: torch.Tensor, txt: torch.Tensor, txt_negative: torch.Tensor, modulations: _Modulations, call: _Call
) -> torch.Tensor:
    """Both stacks and the final layer; the NAG rows' image stream starts the single stack as a copy
    of their positive rows', and is dropped at the end with the NAG rows."""
    streams = (img, txt, txt_negative)
    for index, block in enumerate(model.double_blocks):
        streams = _double_block(block, streams, modulations.double(index, block), call)
    img, txt, txt_negative = streams
    img = call.image_before_single_stack(img)
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
    width = getattr(model, "vec_in_dim", None)  # Neo cuts the pooled vector to it
    vec_negative = call_inputs.positive.take(vec) + model.vector_in(y_negative[:, :width])
    return _FluxModulations(vec + model.vector_in(call_inputs.y[:, :width]), vec_negative)


NEO_CHROMA_VECTORS = 344  # Neo's Chroma makes Chroma's 12·19 double + 3·38 single + 2 vectors whatever its depth


def _chroma_modulations(model: torch.nn.Module, host: Any, call_inputs: _Inputs) -> _Modulations:
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
        return _NeoChromaModulations(model, vectors, call_inputs.positive.take(vectors))
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


def _is_comfy_port(model: Any) -> bool:
    """Forge Neo's Flux is a port of ComfyUI's: ``forward`` makes the tokens, ``forward_orig`` runs the blocks."""
    return hasattr(model, "forward_orig")


def entry_point(model: Any) -> str:
    """The model's method ``nag_forward`` replaces."""
    return "forward_orig" if _is_comfy_port(model) else "forward"


def _neo_runs_blocks_only(model: torch.nn.Module, named: dict[str, Any]) -> bool:
    """Whether Neo's ``forward_orig`` (its arguments by name) would only run the blocks on this call, as
    NAG does: no ControlNet residuals, attention mask, ``post_input`` or ``dit`` block patches, and for
    Flux.1 the pooled vector and (for a guidance-distilled model) the guidance that NAG's rows take."""
    options = named["transformer_options"]
    patched = "post_input" in options.get("patches", {}) or bool(options.get("patches_replace", {}).get("dit"))
    y, guidance = named.get("y"), named["guidance"]
    has_inputs = hasattr(model, "distilled_guidance_layer") or (y is not None and (guidance is not None or not model.guidance_embed))
    return named["control"] is None and named["attn_mask"] is None and not patched and has_inputs


@dataclass(frozen=True)
class _Tokens:
    """One call's token sequences before the input layers: the image's patches (on Neo followed by the
    Kontext reference tokens), the T5 context, and their position ids."""

    img: torch.Tensor
    img_ids: torch.Tensor
    txt: torch.Tensor
    txt_ids: torch.Tensor


class _NagRunner:
    """The guided entry points of one model: Forge main's ``forward`` and Neo's ``forward_orig``."""

    def __init__(
        self,
        model: torch.nn.Module,
        negative: Callable[[], torch.Tensor | dict[str, torch.Tensor]],
        params: NagParams,
        is_active: Callable[[dict], bool],
        on_guided: OnCall | None,
    ) -> None:
        self.model, self.negative, self.params, self.is_active, self.on_guided = model, negative, params, is_active, on_guided
        self.host = sys.modules[type(model.double_blocks[0]).__module__]  # attention, modulation, fp16_fix, embeddings
        self.is_chroma = hasattr(model, "distilled_guidance_layer")

    def positive(self, n: torch.Tensor, context: torch.Tensor, options: dict) -> PositiveRows | None:
        """The positive rows of a call NAG guides; ``None`` outside the window or without a cond chunk."""
        if not self.is_active(options):
            return None
        placed, positive = positive_rows(n, context, options)
        if not placed and self.on_guided is not None:
            self.on_guided(False, "")
        return positive

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Forge main's ``forward``: patches and ids as the host makes them, the blocks, unpatched."""
        positive = self.positive(x, context, kwargs.get("transformer_options") or {})
        if positive is None:
            return type(self.model).forward(self.model, x, timestep, context, *args, **kwargs)
        img, img_ids = _patches(x)
        y, guidance = (None, None) if self.is_chroma else _flux_conditioning(*args, **kwargs)
        tokens = _Tokens(img, img_ids, context, _text_ids(x.shape[0], context.shape[1], x))
        return _image(self.blocks(tokens, positive, timestep, y, guidance), x.shape[2], x.shape[3])

    def forward_orig(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Neo's ``forward_orig``, called by Neo's ``forward`` and read by the host's own signature:
        Flux.1's ``(img, img_ids, txt, txt_ids, timesteps, y, guidance, control, transformer_options,
        attn_mask)`` (Kontext's tokens included, the timestep /1000) or Chroma's, the same without ``y``
        (the timestep as given, zero guidance unless given). The step window is the pass's, read from
        ``transformer_options``."""
        model = self.model
        call = inspect.signature(type(model).forward_orig).bind(model, *args, **kwargs)
        call.apply_defaults()
        named = call.arguments
        positive = self.positive(named["img"], named["txt"], named["transformer_options"])
        if positive is not None and not _neo_runs_blocks_only(model, named):
            if self.on_guided is not None:
                self.on_guided(False, STOOD_ASIDE)
            positive = None
        if positive is None:
            return type(model).forward_orig(*call.args, **call.kwargs)
        tokens = _Tokens(named["img"], named["img_ids"], named["txt"], named["txt_ids"])
        return self.blocks(tokens, positive, named["timesteps"], named.get("y"), named["guidance"])

    def blocks(
        self, tokens: _Tokens, positive: PositiveRows, timestep: torch.Tensor, y: torch.Tensor | None, guidance: torch.Tensor | None
    ) -> torch.Tensor:
        """The input layers, both block stacks with the NAG rows and the final layer: ``[rows, tokens, C·4]``."""
        model, host = self.model, self.host
        img = model.img_in(tokens.img)
        inputs = _Inputs(positive, timestep, y, guidance, img.shape[0], img.device, img.dtype)
        conditioning = self.negative()
        if self.is_chroma:
            modulations, context_negative = _chroma_modulations(model, host, inputs), webui.crossattn(conditioning)
        else:
            modulations = _flux_modulations(model, host, inputs, positive.negatives(conditioning["vector"].to(y)))
            context_negative = conditioning["crossattn"]
        txt_negative = positive.negatives(context_negative.to(tokens.txt))  # on the call's device before indexing
        txt_ids_negative = tokens.txt_ids.new_zeros((len(positive), txt_negative.shape[1], tokens.txt_ids.shape[2]))
        is_neo = _is_comfy_port(model)
        call = _Call(
            positive,
            model.pe_embedder(torch.cat((tokens.txt_ids, tokens.img_ids), dim=1)),
            model.pe_embedder(torch.cat((txt_ids_negative, positive.take(tokens.img_ids)), dim=1)),
            host.attention,
            host.fp16_fix,
            self.params,
            host.apply_mod if is_neo else _scale_and_shift,
            host.fp16_fix if is_neo else _unchanged,
        )
        out = _blocks(model, img, model.txt_in(tokens.txt), model.txt_in(txt_negative), modulations, call)
        if self.on_guided is not None:
            self.on_guided(True, "")
        return out


def nag_forward(
    model: torch.nn.Module,
    negative: Callable[[], torch.Tensor | dict[str, torch.Tensor]],
    params: NagParams,
    is_active: Callable[[dict], bool],
    on_guided: OnCall | None = None,
) -> Forward:
    """A replacement for the model's ``entry_point`` (a Forge ``IntegratedFluxTransformer2DModel`` or
    ``IntegratedChromaTransformer2DModel``: ``forward``; Neo's Flux.1 and Chroma: ``forward_orig``) that guides
    the cond rows with NAG.

    ``negative()`` is the NAG negative now, one row per image of the batch: for Flux the conditioning
    dict (``crossattn [images, tokens, T5]``, ``vector [images, pooled]``), for Chroma the T5 tensor.
    ``is_active(transformer_options)`` says whether NAG guides this call (the step window); when it
    is false, or the call has no cond chunk, the model's own method runs. The call's rows are
    placed from ``cond_or_uncond`` as on the UNet path (whole copies of the batch too); ``on_guided``
    is told, for each active call, whether it was guided, and if not, why ("": its rows could not
    be placed).
    """
    entry = getattr(_NagRunner(model, negative, params, is_active, on_guided), entry_point(model))

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return entry(*args, **kwargs)

    setattr(forward, NAG_FORWARD, True)
    return forward


def is_joint_transformer(model: Any) -> bool:
    """A Flux-like model: double- and single-stream block stacks."""
    return all(hasattr(model, name) for name in ("double_blocks", "single_blocks", "txt_in", "img_in"))


def _neo_blocks_in_flux1_form(model: Any, modulation: bool) -> bool:
    """Neo's blocks as Flux.1 has them: with (or, Chroma, without) per-block modulation layers, text
    before image, Flux.1's MLPs."""
    doubles = all(
        getattr(block, "modulation", None) is modulation and not getattr(block, "flipped_img_txt", False) for block in model.double_blocks
    )
    # Builds without these attributes have only Flux.1's text-first order and MLPs.
    return doubles and all(
        not getattr(block, "yak_mlp", False) and getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim) == block.mlp_hidden_dim
        for block in model.single_blocks
    )


def _is_neo_flux1(model: Any) -> bool:
    """Neo's port in its Flux.1 form: per-block modulation layers, no text norm or text position ids
    (its Flux.2 variants are not run)."""
    flux1 = {"global_modulation": False, "txt_norm": None, "txt_ids_dims": []}
    if not hasattr(model, "vec_in_dim") or any(getattr(model, name, True) != value for name, value in flux1.items()):
        return False
    return _neo_blocks_in_flux1_form(model, modulation=True)


def _is_neo_chroma(model: Any) -> bool:
    """Neo's port of ComfyUI's Chroma: modulations from ``get_modulations``, Flux.1 blocks without
    modulation layers, no block skipped (``skip_mmdit``, ``skip_dit``)."""
    if not (hasattr(model, "get_modulations") and hasattr(model, "distilled_guidance_layer")):
        return False
    skips = getattr(model, "skip_mmdit", None), getattr(model, "skip_dit", None)
    return skips == ([], []) and _neo_blocks_in_flux1_form(model, modulation=False)


def _is_forge_main_flux(model: Any) -> bool:
    """Forge main's ``forward`` → ``inner_forward``, without reference latents (an older Neo had
    Kontext on that structure; NAG's run of ``forward`` would leave them out)."""
    return hasattr(model, "inner_forward") and "ref_latents" not in inspect.signature(type(model).forward).parameters


def is_flux_family(model: Any) -> bool:
    """Flux.1 or Chroma as Forge main builds them (``inner_forward``), or Flux.1 (Kontext too) or Chroma
    as Forge Neo's ComfyUI ports build them (``forward_orig``)."""
    if not is_joint_transformer(model):
        return False
    return (_is_neo_flux1(model) or _is_neo_chroma(model)) if _is_comfy_port(model) else _is_forge_main_flux(model)


class FluxPass(ForgeModelPass):
    """NAG on a Flux or Chroma model for one sampling pass (``nag_forward`` as the object patch)."""

    def entry_point(self, model: torch.nn.Module) -> str:
        return entry_point(model)

    def nag_forward(self, model: torch.nn.Module) -> Forward:
        negative, active = self.weak(lambda nag_pass: nag_pass.nag.negative), self.weak(lambda nag_pass: nag_pass.active, False)
        return nag_forward(model, negative, self.params, active, self.nag.count(self.report))

    def hooked_text(self, model: torch.nn.Module) -> str:
        return f"{len(model.double_blocks)} double + {len(model.single_blocks)} single blocks"
