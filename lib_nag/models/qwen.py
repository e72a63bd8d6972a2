"""The Qwen-Image family on Forge Neo: Qwen-Image and Qwen-Image-Edit (``QwenImageTransformer2DModel``
and its engine ``QwenImage``: ``webui/backend/nn/qwen.py``, ``webui/backend/diffusion_engine/qwen.py`` and
``webui/backend/args.py`` read in a copy of Neo v3.5, exo101/sd-webui-forge-neo-v3 @ 5692d2d1, all added
in f95f632a; Neo's port of ComfyUI v0.3.64 ``comfy/ldm/qwen_image``).

Qwen-Image is 60 dual-stream (MMDiT) blocks over ``[text; image]`` tokens, modulated by the timestep
alone. The authors' ComfyUI-NAG (ef8a641) has no Qwen code; this follows their dual-stream pattern (Flux's
``NAGDoubleStreamBlock``, SD3's joint blocks; ``lib_nag.joint_attention.double_stream_attention``): one
NAG text stream per positive row, the NAG negative through ``txt_norm`` and ``txt_in``, runs through every
block with the text-side weights and its positive row's modulation (the same ``temb``: no pooled text);
in each block it attends over itself and its positive row's image q/k/v, and the positive rows' image
attention output (heads merged, before ``to_out``) is guided. The NAG text's rotary positions are the
model's own for a text of its length: ``txt_start + j`` on all three axes, where ``txt_start`` depends
on the image size only, so the positive rows' rotated image q/k serve the NAG attention as they are.

Qwen-Image-Edit's reference latents (Neo's global ``dynamic_args.ref_latents``, batch 1) are image-stream
tokens after the image's, as Flux Kontext's are to the authors' NAGFlux: the NAG text attends over them
with the rest of the positive row's image, their attention output is guided too, and Neo's forward cuts
them at the end. Neo appends them without expanding them to the call's rows; NAG hands its run of the
forward references expanded to the rows, so a call of several rows runs.

How it runs: NAG's object patch of ``forward`` (``QwenImagePass``) calls the model's own ``forward`` with,
for that call only, a ``dit`` double-block replace patch on every block: Neo's forward keeps making the
patches, reference tokens, ids, rotary embedding and ``temb`` and runs the final layer and unpatchify; the
patches run each block on the batch and the NAG text stream through the block's own submodules (LoRA and
quantized weights work) and the model module's ``apply_rotary_emb`` and ``attention_function``. Rows that
are not positive get exactly what the host computes. A call without positive rows, outside the window, or
with what NAG leaves to the model (a ControlNet, an attention mask, other ``dit`` or ``double_block``
patches) runs the model's own ``forward``; the last kind is counted, with the reason.

The engine reads ``prompt.is_negative_prompt``: a positive encode consumes the img2img latent and
overwrites the reference latents, so the NAG negative is encoded as a negative prompt (text only, the
text-to-image template), as Neo encodes its own. SVDQ (Nunchaku) checkpoints load another model class
with other blocks; NAG names it and stands aside.
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from functools import partial
from typing import Any

import torch

from ..attention import PositiveRows
from ..joint_attention import QKV, Attend, double_stream_attention
from ..params import NagParams
from ..webui.conditioning import crossattn
from ..webui.family import FORGE, ModelFamily
from ..webui.forge_patcher import RowsOf
from ..webui.passes import Forward, OnCall
from .runner import Runner, RunnerPass, patched_forward

MODEL, BLOCK = "QwenImageTransformer2DModel", "QwenImageTransformerBlock"
HOST_FUNCTIONS = ("attention_function", "apply_rotary_emb", "dynamic_args")  # what NAG calls of the model's module
STOOD_ASIDE = "a ControlNet, attention mask or block patch on the call (NAG leaves such calls to the model)"
NOT_RUN = "the model's forward did not run NAG's block patches"
PROJECTIONS = {  # a stream's q, k, v projections and q, k norms in ``Attention``
    "img": ("to_q", "to_k", "to_v", "norm_q", "norm_k"),
    "txt": ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"),
}


def _heads_first(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)


def _heads_merged(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, L, Dh]`` → ``[B, L, H·Dh]``, as the host flattens its joint q/k/v."""
    return t.transpose(1, 2).flatten(2)


def _updated(
    block: torch.nn.Module, stream: str, x: torch.Tensor, attn_out: torch.Tensor, gate: torch.Tensor, mod2: torch.Tensor
) -> torch.Tensor:
    """A stream's residual updates in the block's order: the gated attention output, then the MLP."""
    x = x + gate * attn_out
    modulated, gate2 = block._modulate(getattr(block, f"{stream}_norm2")(x), mod2)
    return torch.addcmul(x, gate2, getattr(block, f"{stream}_mlp")(modulated))


class _GuidedCall:
    """One guided model call: the NAG text stream (one row per positive row), carried from block to
    block by the ``dit`` replace patches the host calls in order."""

    def __init__(self, host: Any, positive: PositiveRows, txt_negative: torch.Tensor, pe_negative: torch.Tensor, params: NagParams) -> None:
        self.host, self.positive, self.params = host, positive, params
        self.txt_negative, self.pe_negative = txt_negative, pe_negative
        self.blocks_run = 0

    def attend(self, heads: int) -> Attend:
        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _pe: torch.Tensor | None) -> torch.Tensor:
            return self.host.attention_function(_heads_merged(q), _heads_merged(k), _heads_merged(v), heads, None)

        return attend

    def projected(self, attn: torch.nn.Module, stream: str, x: torch.Tensor, pe: torch.Tensor) -> QKV:
        """A stream's q/k/v, qk-normed and rotated (each token on its own: the host rotates the joint
        sequence, the same values), as ``[B, H, L, Dh]``."""
        to_q, to_k, to_v, norm_q, norm_k = (getattr(attn, name) for name in PROJECTIONS[stream])
        q, k, v = (projection(x).unflatten(-1, (attn.heads, -1)) for projection in (to_q, to_k, to_v))
        rotate = self.host.apply_rotary_emb
        return QKV(_heads_first(rotate(norm_q(q), pe)), _heads_first(rotate(norm_k(k), pe)), _heads_first(v))

    def block(self, block: torch.nn.Module, args: dict[str, torch.Tensor], _original: Any) -> dict[str, torch.Tensor]:
        """``QwenImageTransformerBlock`` on the batch (``args``: img, txt, vec = temb, pe) and the NAG text
        stream, as a ``dit`` double-block replace patch."""
        img, txt, temb, pe = args["img"], args["txt"], args["vec"], args["pe"]
        positive, attn, txt_length = self.positive, block.attn, txt.shape[1]
        img_mod1, img_mod2 = block.img_mod(temb).chunk(2, dim=-1)
        txt_mod1, txt_mod2 = block.txt_mod(temb).chunk(2, dim=-1)
        negative_mod1, negative_mod2 = positive.take(txt_mod1), positive.take(txt_mod2)  # temb carries no text
        img_modulated, img_gate = block._modulate(block.img_norm1(img), img_mod1)
        txt_modulated, txt_gate = block._modulate(block.txt_norm1(txt), txt_mod1)
        negative_modulated, negative_gate = block._modulate(block.txt_norm1(self.txt_negative), negative_mod1)
        txt_out, negative_out, img_out = double_stream_attention(
            self.projected(attn, "txt", txt_modulated, pe[:, :txt_length]),
            self.projected(attn, "txt", negative_modulated, self.pe_negative),
            self.projected(attn, "img", img_modulated, pe[:, txt_length:]),
            positive,
            None,
            None,
            self.attend(attn.heads),
            self.params,
        )
        img = _updated(block, "img", img, attn.to_out[1](attn.to_out[0](img_out)), img_gate, img_mod2)
        txt = _updated(block, "txt", txt, attn.to_add_out(txt_out), txt_gate, txt_mod2)
        self.txt_negative = _updated(block, "txt", self.txt_negative, attn.to_add_out(negative_out), negative_gate, negative_mod2)
        self.blocks_run += 1
        return {"img": img, "txt": txt}


def _leaves_to_the_model(named: dict[str, Any]) -> bool:
    """Whether the call carries what NAG leaves to the model: a ControlNet, an attention mask (Neo's
    blocks ignore it; a later build may not), or block patches of another extension."""
    options = named["transformer_options"]
    patched = bool(options.get("patches_replace", {}).get("dit")) or bool(options.get("patches", {}).get("double_block"))
    return named["control"] is not None or named["attention_mask"] is not None or patched


def _text_start(model: torch.nn.Module, x: torch.Tensor) -> int:
    """The first text position Neo gives a call's text: half the larger side of the patch grid."""
    half = model.patch_size // 2
    return round(max(((x.shape[-1] + half) // model.patch_size) // 2, ((x.shape[-2] + half) // model.patch_size) // 2))


def _rows_of_references(references: list[torch.Tensor] | None, x: torch.Tensor) -> list[torch.Tensor] | None:
    """Batch-1 references (Neo encodes them so) expanded to the call's rows."""
    rows = x.shape[0]
    if not references or all(ref.shape[0] == rows for ref in references):
        return references
    return [ref.to(x).expand(rows, *ref.shape[1:]).contiguous() if ref.shape[0] == 1 else ref for ref in references]


class _NagRunner(Runner):
    """The guided ``forward`` of one model."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Neo's ``forward(x, timesteps, context, attention_mask=None, guidance=None, ref_latents=None,
        transformer_options={}, control=None, **kwargs)``, read by the model's own signature."""
        model = self.model
        call = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
        call.apply_defaults()
        named = call.arguments
        positive = self.rows_of(named["x"], named["context"], named)
        if positive is not None and _leaves_to_the_model(named):
            self.told(False, STOOD_ASIDE)
            positive = None
        if positive is None:
            return type(model).forward(*call.args, **call.kwargs)
        guided = self.guided_call(positive, named["x"], named["context"])
        blocks = {("double_block", index): partial(guided.block, block) for index, block in enumerate(model.transformer_blocks)}
        options = named["transformer_options"]
        named["transformer_options"] = {**options, "patches_replace": {**options.get("patches_replace", {}), "dit": blocks}}
        named["ref_latents"] = _rows_of_references(named["ref_latents"] or self.host.dynamic_args.get("ref_latents"), named["x"])
        out = type(model).forward(*call.args, **call.kwargs)
        ran = guided.blocks_run == len(model.transformer_blocks)
        self.told(ran, "" if ran else NOT_RUN)
        return out

    def guided_call(self, positive: PositiveRows, x: torch.Tensor, context: torch.Tensor) -> _GuidedCall:
        """The NAG text stream's input (``txt_norm``, ``txt_in``) and its rotary embedding: positions
        ``txt_start + j`` on all three axes, as the model gives a text of its length."""
        model = self.model
        context_negative = positive.negatives(crossattn(self.negative()).to(context))  # on the call's device before indexing
        start = _text_start(model, x)
        ids = torch.arange(start, start + context_negative.shape[1], device=x.device, dtype=torch.float32)
        pe_negative = model.pe_embedder(ids[None, :, None].expand(1, -1, 3)).squeeze(1).unsqueeze(2).to(x.dtype)
        return _GuidedCall(self.host, positive, model.txt_in(model.txt_norm(context_negative)), pe_negative, self.params)


def nag_forward(
    model: torch.nn.Module, negative: Callable[[], Any], params: NagParams, rows_of: RowsOf, on_call: OnCall | None = None
) -> Forward:
    """A replacement for the model's ``forward`` that guides the positive rows with NAG.

    ``negative()`` is the NAG negative now: its context, one row per image of the batch ``[images,
    tokens, 3584]``. ``rows_of(x, context, arguments)`` gives the call's positive rows (Forge:
    ``forge_rows``) or None, and then the model's own ``forward`` runs. ``on_call`` is told, for each
    call with positive rows, whether it was guided, and if not, why.
    """
    return patched_forward(_NagRunner(model, negative, params, rows_of, on_call).forward)


def _is_named(cls: type, name: str) -> bool:
    return any(base.__name__ == name for base in cls.__mro__)


def is_qwen_image(model: Any) -> bool:
    """Neo's own Qwen-Image model: its class and its blocks' from one module that has the functions NAG calls."""
    module = sys.modules.get(type(model).__module__)
    if type(model).__name__ != MODEL or not all(hasattr(module, name) for name in HOST_FUNCTIONS):
        return False
    blocks = getattr(model, "transformer_blocks", ())
    return len(blocks) > 0 and all(type(b).__name__ == BLOCK and type(b).__module__ == type(model).__module__ for b in blocks)


def unsupported_qwen_image(model: Any) -> str:
    """Why a Qwen-Image model that is not Neo's own (an SVDQ/Nunchaku one) is not run."""
    if _is_named(type(model), MODEL) and not is_qwen_image(model):
        name = type(model).__name__
        return f"NAG runs Forge Neo's own Qwen-Image model; {name} (SVDQ/Nunchaku or another build) has other blocks, not supported yet"
    return ""


class QwenImagePass(RunnerPass):
    """NAG on a Qwen-Image model for one sampling pass (the runner's forward as the object patch). The
    NAG negative is encoded as a negative prompt: Neo's engine encodes a positive one with the reference
    images and replaces the reference latents the model reads."""

    encodes_as_negative_prompt = True
    runner = _NagRunner

    def hooked_text(self, model: torch.nn.Module) -> str:
        return f"{len(model.transformer_blocks)} double-stream blocks"


FAMILY = ModelFamily("Qwen-Image", {FORGE: QwenImagePass}, is_qwen_image, unsupported_qwen_image)
