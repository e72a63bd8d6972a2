"""The NextDiT family: Z-Image and Lumina 2 (Neta Lumina) on Forge Neo, one network, ``NextDiT`` in
``backend/nn/lumina.py`` (Neo's port of ComfyUI v0.3.77 ``comfy/ldm/lumina/model.py``), with the engines
``backend/diffusion_engine/zimage.py`` and ``lumina.py`` and their text engines
``backend/text_processing/qwen3_engine.py`` and ``gemma_engine.py``, read in a copy of Neo v3.5,
exo101/sd-webui-forge-neo-v3 @ 5692d2d1 (``webui/``, added in f95f632a).

The authors' ComfyUI-NAG (ef8a641) has no NextDiT code. NAG here follows their single-stream rule (Flux
``NAGSingleStreamBlock``, HiDream, Hunyuan Video): the NAG row is a whole ``[NAG text; image]`` stream
with its own modulation, both rows attend, the positive row's image attention output (before the
out-projection) is guided away from the NAG row's and written into both rows, text outputs stay
unguided. Mapped onto NextDiT:

- The NAG negative goes through ``cap_embedder``, Z-Image's caption padding (``cap_pad_token`` up to a
  multiple of ``pad_tokens_multiple``) and the ``context_refiner`` (text alone, no timestep), as the
  model treats a caption. The ``noise_refiner`` sees the image alone: the NAG row shares the positive
  row's refined image tokens, as the authors' NAG rows share the positive image stream wherever it is
  computed without the text. (On Z-Image with image pad tokens, the refined image depends on the
  caption's padded length through the pads' rotary offset; the NAG row keeps the positive row's.)
- Every main layer is single-stream over ``[caption; image]`` (Z-Image's image pad tokens count as
  image). Its adaLN reads the timestep only, so the NAG row's modulation is its positive row's and its
  image tokens stay equal to the positive row's in every layer (same input, modulation and guided
  attention output): the NAG row runs as its text alone and attends with its positive row's image
  q/k/v (``single_stream_text_attention``); its text tokens get their own out-projection, sandwich
  norm, gate and feed-forward.
- Rotary positions: the model puts the caption at axis-0 positions ``1…L`` and the image at ``L + 1``
  (``L`` the padded caption length), Z-Image's image pad tokens at 0. The NAG rows are rotated with
  the positions the model gives a ``[NAG text; image]`` sequence (the image at ``L′ + 1``): RoPE is
  applied inside the attention call, to each set of rows with its own positions, so the NAG rows'
  text–image and image–pad offsets are the model's for the NAG text's length. (Shifting the NAG text
  by ``L − L′`` to reuse the positive rows' rotated image q/k gets the text–image offsets right but
  not the offsets to Z-Image's image pad tokens.)
- Lumina 2's grouped-query attention: k/v are repeated per query head as the host does, after RoPE.

The host's own submodules, ``apply_rope``, ``attention_function``, ``modulate`` and ``clamp_fp16`` are
called (quantized and LoRA weights work); rows that are not positive get exactly what the host
computes. A call without cond rows, outside the window, or carrying what the host's forward reads or
a later build might (an attention mask, a ControlNet, ``dit`` block patches, RoPE options) runs the
model's own ``forward``. The NAG negative is encoded as the host encodes a negative prompt: Lumina 2's
engine then gives it the negative system template, as its CFG negative; Z-Image's engine reads no flag.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import PositiveRows
from ..joint_attention import QKV, single_stream_text_attention
from ..params import NagParams
from ..webui.family import FORGE, ModelFamily
from ..webui.forge_patcher import RowsOf
from ..webui.passes import Forward, OnCall
from .runner import Runner, RunnerPass, patched_forward

STOOD_ASIDE = "a ControlNet, attention mask, block patch or RoPE option on the call, which NAG's own run of the layers would leave out"
PARTS = ("x_embedder", "cap_embedder", "t_embedder", "context_refiner", "noise_refiner", "layers", "final_layer", "rope_embedder")
FORWARD = ("x", "timesteps", "context", "num_tokens", "attention_mask", "transformer_options")  # Neo's NextDiT.forward
Modulation = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # scale_msa, gate_msa, scale_mlp, gate_mlp


def _positions(caption: int, rows: int, columns: int, image: int, count: int, device: torch.device) -> torch.Tensor:
    """The rotary ids ``patchify_and_embed`` gives ``count`` sequences of ``caption`` caption tokens and
    ``image`` image tokens (``rows × columns`` patches, then pad tokens): caption ``(1…caption, 0, 0)``,
    patches ``(caption + 1, row, column)``, pad tokens ``(0, 0, 0)``."""
    ids = torch.zeros(count, caption + image, 3, dtype=torch.float32, device=device)
    ids[:, :caption, 0] = torch.arange(caption, dtype=torch.float32, device=device) + 1.0
    patches = ids[:, caption : caption + rows * columns]
    patches[..., 0] = caption + 1
    patches[..., 1] = torch.arange(rows, dtype=torch.float32, device=device).repeat_interleave(columns)
    patches[..., 2] = torch.arange(columns, dtype=torch.float32, device=device).repeat(rows)
    return ids


def _qkv(attention: torch.nn.Module, x: torch.Tensor) -> QKV:
    """``JointAttention``'s q, k, v before RoPE (qk-normed), ``[B, heads, L, Dh]``: a view of the host's
    ``[B, L, heads, Dh]``; k and v with ``n_local_kv_heads`` heads."""
    batch, tokens, _ = x.shape
    heads, kv_heads, width = attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim
    q, k, v = torch.split(attention.qkv(x), [heads * width, kv_heads * width, kv_heads * width], dim=-1)
    q = attention.q_norm(q.view(batch, tokens, heads, width))
    k = attention.k_norm(k.view(batch, tokens, kv_heads, width))
    return QKV(q.movedim(1, 2), k.movedim(1, 2), v.view(batch, tokens, kv_heads, width).movedim(1, 2))


@dataclass(frozen=True)
class _Call:
    """What every main layer of one guided call needs."""

    host: Any  # the model's module: apply_rope, attention_function, modulate, clamp_fp16
    positive: PositiveRows
    adaln_input: torch.Tensor
    freqs: torch.Tensor
    freqs_negative: torch.Tensor
    caption: int
    params: NagParams
    options: dict

    def attend(self, attention: torch.nn.Module) -> Callable[..., torch.Tensor]:
        """``JointAttention.forward`` after its qk-norm, on ``[B, heads, L, Dh]`` q, k, v: RoPE, k/v
        repeated per query head, the host's attention; heads merged."""

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
            q, k = self.host.apply_rope(q.movedim(1, 2), k.movedim(1, 2), freqs)
            v = v.movedim(1, 2)
            n_rep = attention.n_local_heads // attention.n_local_kv_heads
            k = k.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)  # as the host: even for one copy
            v = v.unsqueeze(3).repeat(1, 1, 1, n_rep, 1).flatten(2, 3)
            heads = attention.n_local_heads
            return self.host.attention_function(
                q.movedim(1, 2), k.movedim(1, 2), v.movedim(1, 2), heads, None, skip_reshape=True, transformer_options=self.options
            )

        return attend

    def update(self, block: torch.nn.Module, x: torch.Tensor, attended: torch.Tensor, modulation: Modulation) -> torch.Tensor:
        """The rest of a modulated ``JointTransformerBlock``: out-projection, sandwich norms, gates, FFN."""
        host, (_, gate_msa, scale_mlp, gate_mlp) = self.host, modulation
        x = x + gate_msa.unsqueeze(1).tanh() * block.attention_norm2(host.clamp_fp16(block.attention.out(attended)))
        fed = block.feed_forward(host.modulate(block.ffn_norm1(x), scale_mlp))
        return x + gate_mlp.unsqueeze(1).tanh() * block.ffn_norm2(host.clamp_fp16(fed))

    def layer(self, block: torch.nn.Module, x: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """A main layer on the batch (``[caption; image]``) and the NAG rows' text."""
        modulation = block.adaLN_modulation(self.adaln_input).chunk(4, dim=1)
        negative = tuple(self.positive.take(m) for m in modulation)  # the timestep only: the positive rows'
        qkv = _qkv(block.attention, self.host.modulate(block.attention_norm1(x), modulation[0]))
        qkv_negative = _qkv(block.attention, self.host.modulate(block.attention_norm1(text), negative[0]))
        nag = self.positive, self.freqs, self.freqs_negative, self.attend(block.attention), self.params
        out, out_negative = single_stream_text_attention(qkv, qkv_negative, self.caption, True, *nag)
        return self.update(block, x, out, modulation), self.update(block, text, out_negative, negative)


def _runs_layers_only(named: dict[str, Any]) -> bool:
    """Whether the call carries nothing NAG's run would leave out: no attention mask (the context
    refiner's), no ControlNet, no ``dit`` block patches, no ``rope_options`` (this Neo's NextDiT ignores
    the last three; later ComfyUI ports read ``rope_options``, which NAG's positions would miss)."""
    options = named["transformer_options"] or {}
    replaced = bool((options.get("patches_replace") or {}).get("dit")) or options.get("rope_options") is not None
    return named["attention_mask"] is None and named.get("kwargs", {}).get("control") is None and not replaced


class _NagRunner(Runner):
    """The guided ``forward`` of one model."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        model = self.model
        call = inspect.signature(type(model).forward).bind(model, *args, **kwargs)
        call.apply_defaults()
        named = call.arguments
        positive = self.rows_of(named["x"], named["context"], named)
        if positive is not None and not _runs_layers_only(named):
            self.told(False, STOOD_ASIDE)
            positive = None
        if positive is None:
            return type(model).forward(*call.args, **call.kwargs)
        out = self.guided(named["x"], named["timesteps"], named["context"], positive, named["transformer_options"])
        self.told(True, "")
        return out

    def nag_text(
        self, positive: PositiveRows, x: torch.Tensor, context: torch.Tensor, tokens: int, options: dict
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The NAG rows' caption after the context refiner, and the rotary embedding of ``[NAG caption;
        image]`` (``tokens`` image tokens) as ``patchify_and_embed`` builds it; ``x`` the padded latents."""
        model, p = self.model, self.model.patch_size
        caption = model.cap_embedder(positive.negatives(self.negative().to(context)))  # on the call's device before indexing
        if model.pad_tokens_multiple is not None:
            pads = (-caption.shape[1]) % model.pad_tokens_multiple
            caption = torch.cat((caption, model.cap_pad_token.to(caption).expand(len(caption), pads, -1)), dim=1)
        length = caption.shape[1]
        ids = _positions(length, x.shape[2] // p, x.shape[3] // p, tokens, len(positive), x.device)
        freqs = model.rope_embedder(ids).movedim(1, 2).to(x.dtype)
        for layer in model.context_refiner:
            caption = layer(caption, None, freqs[:, :length], transformer_options=options)
        return caption, freqs

    def guided(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, positive: PositiveRows, options: dict
    ) -> torch.Tensor:
        """``NextDiT.forward`` with a NAG row per positive row in every main layer."""
        model = self.model
        height, width = x.shape[2:]
        x = self.host.pad_to_patch_size(x, (model.patch_size, model.patch_size))
        adaln_input = model.t_embedder((1.0 - timesteps) * model.time_scale, dtype=x.dtype)
        tokens, _, image_sizes, caption_sizes, freqs = model.patchify_and_embed(
            x, model.cap_embedder(context), None, adaln_input, None, transformer_options=options
        )
        caption = caption_sizes[0]
        text, freqs_negative = self.nag_text(positive, x, context, tokens.shape[1] - caption, options)
        call = _Call(self.host, positive, adaln_input, freqs.to(tokens.device), freqs_negative, caption, self.params, options)
        for block in model.layers:
            tokens, text = call.layer(block, tokens, text)
        out = model.unpatchify(model.final_layer(tokens, adaln_input), image_sizes, caption_sizes, return_tensor=True)
        return -out[:, :, :height, :width]


def nag_forward(
    model: torch.nn.Module, negative: Callable[[], torch.Tensor], params: NagParams, rows_of: RowsOf, on_call: OnCall | None = None
) -> Forward:
    """A replacement for a ``NextDiT``'s ``forward`` that guides the positive rows with NAG (see
    ``runner.Runner``); ``negative()`` is ``[images, tokens, caption width]``."""
    return patched_forward(_NagRunner(model, negative, params, rows_of, on_call).forward)


def _looks_like_nextdit(model: Any) -> bool:
    return all(hasattr(model, name) for name in PARTS) and hasattr(model, "patchify_and_embed")


def unsupported_nextdit(model: Any) -> str:
    """Why a NextDiT-like model is not run ("" for a NextDiT NAG runs, or another model)."""
    if not _looks_like_nextdit(model):
        return ""
    name = type(model).__name__
    attentions = {type(block.attention).__name__ for block in (*model.context_refiner, *model.noise_refiner, *model.layers)}
    if "Nunchaku" in name or any("Nunchaku" in attention for attention in attentions):
        return "NAG does not run Nunchaku (SVDQuant) Z-Image: its attention fuses the projections, qk-norm and RoPE"
    if getattr(model, "clip_text_pooled_proj", None) is not None:
        return "NAG runs Z-Image and Lumina 2; a NextDiT with a pooled text embedding (its modulation carries the prompt) is not supported"
    signature = tuple(inspect.signature(type(model).forward).parameters)[1 : len(FORWARD) + 1]
    if name != "NextDiT" or attentions != {"JointAttention"} or signature != FORWARD:
        return f"NAG runs Forge Neo's own NextDiT (Z-Image, Lumina 2); this host's {name} is another build, not supported yet"
    return ""


def is_nextdit(model: Any) -> bool:
    """Neo's NextDiT as it builds Z-Image and Lumina 2."""
    return _looks_like_nextdit(model) and not unsupported_nextdit(model)


class NextDiTPass(RunnerPass):
    """NAG on a Z-Image or Lumina 2 model for one sampling pass (the runner's forward as the object patch).
    The NAG negative is encoded as a negative prompt: Lumina 2's engine picks its system template by
    ``is_negative_prompt`` (the host's negatives get the "low-quality" one); Z-Image's ignores it."""

    encodes_as_negative_prompt = True
    runner = _NagRunner

    def hooked_text(self, model: torch.nn.Module) -> str:
        return f"{len(model.context_refiner)} context-refiner + {len(model.layers)} single-stream layers"


FAMILY = ModelFamily("NextDiT", {FORGE: NextDiTPass}, is_nextdit, unsupported_nextdit)
