"""The Krea 2 family on Forge Neo: ``SingleStreamDiT`` (``backend/nn/krea.py``, citing ComfyUI v0.26.1
``comfy/ldm/krea2/model.py``; engine ``Krea2``, ``backend/diffusion_engine/krea.py``), read in a copy of
Neo v3.5, exo101/sd-webui-forge-neo-v3 @ 5692d2d1.

The model refines the text encoder's stacked layers with a time-independent text-fusion transformer
(``txtfusion``, then ``txtmlp``) and runs 28 single-stream blocks over ``[text; image]`` tokens, with
grouped-query attention (48 query, 12 key/value heads) and a gated attention output,
``wo(attention · sigmoid(gate(x)))``. Every block is modulated by ``tproj(tmlp(time))`` plus a per-block
constant: no text. The authors' ComfyUI-NAG (ef8a641) has no Krea code; NAG here follows their
single-stream rule for text-first models (their Flux single-stream blocks, ``flux/layers.py``): each
positive row gets a NAG row ``[NAG text; image]``, its image tokens' attention output is guided away from
the NAG row's and written into both, text outputs stay unguided, and each row runs its own gate,
out-projection and MLP. NAG is defined on the attention output, so it guides the attention before the
output gate (``sigmoid(gate(x))`` then scales the guided output as it scales the host's); the gate is
per token, from each row's own input. The modulation carries no text, so the NAG rows' image tokens
stay their positive rows': the NAG rows are run as their text tokens alone, attending with the positive
rows' image q/k/v (``single_stream_text_attention``, text first). All text ids are zero, so the NAG text
needs no positions of its own.

The NAG negative goes through ``txtfusion`` and ``txtmlp`` as the prompt does; Neo's engine encodes it as
a negative prompt (text only: a positive would re-encode reference images and clear or set Neo's global
reference latents). The model's reference-latent path (``ref_latents`` among the forward's keywords) is
not reachable from Neo's sampler in that copy; NAG leaves it out, and a call that carries reference
latents runs the model's own ``forward``, counted with the reason. The model reads nothing else of a call
(no ControlNet, patches or mask reach its blocks).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..attention import PositiveRows
from ..joint_attention import QKV, Attend
from ..params import NagParams
from ..webui.conditioning import crossattn
from ..webui.family import FORGE, ModelFamily
from ..webui.forge_patcher import RowsOf
from ..webui.passes import Forward, OnCall
from .neo_single_stream import Anatomy, BlockCall
from .runner import Runner, RunnerPass, patched_forward

STOOD_ASIDE = "reference latents on the call, which NAG's own run of the blocks would leave out"


def _attend(host: Any, heads: int, kv_heads: int, options: dict) -> Attend:
    """The host's RoPE, k and v repeated per query group, and attention (``skip_reshape``, heads merged)."""

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor | None) -> torch.Tensor:
        q, k = host.apply_rope(q, k, pe)
        if kv_heads != heads:
            k, v = (t.repeat_interleave(heads // kv_heads, dim=1) for t in (k, v))
        return host.attention_function(q, k, v, heads, mask=None, skip_reshape=True, transformer_options=options)

    return attend


def _heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, L, H·D]`` → ``[B, H, L, D]``, a view as the host's ``rearrange`` makes it."""
    return t.view(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)


def _attention_inputs(attention: torch.nn.Module, x: torch.Tensor) -> tuple[QKV, torch.Tensor]:
    """q, k (qk-normed, before the RoPE), v of ``Attention``, and its output gate's logits."""
    q, k, v, gate = attention.wq(x), attention.wk(x), attention.wv(x), attention.gate(x)
    q, k = attention.qknorm(_heads(q, attention.heads), _heads(k, attention.kvheads))
    return QKV(q, k, _heads(v, attention.kvheads)), gate


def _block(
    block: torch.nn.Module, streams: tuple[torch.Tensor, torch.Tensor], vecs: tuple[torch.Tensor, torch.Tensor], call: BlockCall
) -> tuple[torch.Tensor, torch.Tensor]:
    """``SingleStreamBlock`` on the batch and on the NAG rows' text (``vecs``: their ``tvec``s): attention
    with NAG before each row's own output gate, then each its own out-projection, gates and MLP."""
    modulations = [block.mod(vec) for vec in vecs]
    inputs = [
        _attention_inputs(block.attn, (1 + prescale) * block.prenorm(x) + preshift)
        for x, (prescale, preshift, *_) in zip(streams, modulations, strict=True)
    ]
    outs = call.attention(inputs[0][0], inputs[1][0])
    updated = []
    for x, out, (_, gate), modulation in zip(streams, outs, inputs, modulations, strict=True):
        _, _, pregate, postscale, postshift, postgate = modulation
        x = x + pregate * block.attn.wo(out * torch.sigmoid(gate))
        updated.append(x + postgate * block.mlp((1 + postscale) * block.postnorm(x) + postshift))
    return updated[0], updated[1]


def _image_ids(rows: int, grid: tuple[int, int], device: torch.device) -> torch.Tensor:
    """The model's image ids (0, row, column): ``[rows, h·w, 3]``."""
    ids = torch.zeros(*grid, 3, device=device, dtype=torch.float32)
    ids[..., 1] = torch.arange(grid[0], device=device, dtype=torch.float32)[:, None]
    ids[..., 2] = torch.arange(grid[1], device=device, dtype=torch.float32)[None, :]
    return ids.reshape(1, grid[0] * grid[1], 3).repeat(rows, 1, 1)


class _NagRunner(Runner):
    """The guided ``forward`` of one ``SingleStreamDiT`` (the host: RoPE, attention, time embedding, padding)."""

    def text(self, context: torch.Tensor, options: dict) -> torch.Tensor:
        """``[B, 1, L, layers·width]`` (or 3-D) through the text fusion and ``txtmlp``, as the model runs it."""
        model = self.model
        return model.txtmlp(model.txtfusion(model._unpack_context(context.squeeze(1)), mask=None, transformer_options=options))

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        attention_mask: Any = None,
        transformer_options: dict | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """The host's ``forward(x, timesteps, context, attention_mask=None, transformer_options={}, **kwargs)``;
        5-D latents ``[B, C, T, H, W]`` are folded to ``[B·T, C, H, W]`` and back as the host folds them."""
        model, options = self.model, transformer_options if transformer_options is not None else {}
        positive = self.rows_of(x, context, {"transformer_options": options})
        references = kwargs.get("ref_latents")
        if positive is not None and references is not None and len(references) > 0:
            self.told(False, STOOD_ASIDE)
            positive = None
        if positive is None:
            return type(model).forward(model, x, timesteps, context, attention_mask, options, **kwargs)
        shape = x.shape
        if x.ndim == 5:
            x = x.reshape(shape[0] * shape[2], shape[1], *shape[3:])
        out = self.guided(x, timesteps, context, positive, options)
        self.told(True, "")
        return out.reshape(shape[0], shape[2], *out.shape[1:]).movedim(1, 2) if len(shape) == 5 else out

    def guided(
        self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, positive: PositiveRows, options: dict
    ) -> torch.Tensor:
        """The forward on 4-D latents, the NAG rows beside the batch's."""
        model, host, patch = self.model, self.host, self.model.patch
        batch, channels, height, width = x.shape
        x = host.pad_to_patch_size(x, (patch, patch))
        grid = (x.shape[-2] // patch, x.shape[-1] // patch)
        patches = x.view(batch, channels, grid[0], patch, grid[1], patch).permute(0, 2, 4, 1, 3, 5)
        img = model.first(patches.reshape(batch, grid[0] * grid[1], channels * patch * patch))
        t = model.tmlp(host.timestep_embedding(timesteps, model.tdim).unsqueeze(1).to(img.dtype))
        tvec = model.tproj(t)
        text = self.text(context, options)
        text_negative = self.text(positive.negatives(crossattn(self.negative()).to(context)), options)  # on the call's device first
        ids = [
            torch.cat((torch.zeros(rows, tokens, 3, device=img.device, dtype=torch.float32), _image_ids(rows, grid, img.device)), dim=1)
            for rows, tokens in ((batch, text.shape[1]), (len(positive), text_negative.shape[1]))
        ]
        attention = model.blocks[0].attn
        attend = _attend(host, attention.heads, attention.kvheads, options)
        call = BlockCall(positive, text.shape[1], True, model.pe_embedder(ids[0]), model.pe_embedder(ids[1]), attend, self.params)
        streams = (torch.cat((text, img), dim=1), text_negative)
        vecs = (tvec, positive.take(tvec))  # the NAG rows': their positive rows' time
        for block in model.blocks:
            streams = _block(block, streams, vecs, call)
        final = model.last(streams[0], t)[:, text.shape[1] :, :]
        image = final.view(batch, *grid, model.channels, patch, patch).permute(0, 3, 1, 4, 2, 5)
        return image.reshape(batch, model.channels, grid[0] * patch, grid[1] * patch)[:, :, :height, :width]


def nag_forward(
    model: torch.nn.Module, negative: Callable[[], Any], params: NagParams, rows_of: RowsOf, on_call: OnCall | None = None
) -> Forward:
    """A replacement for the ``SingleStreamDiT``'s ``forward`` that guides the positive rows with NAG
    (see ``runner.Runner``); ``negative()`` is ``[images, 1, tokens, 12·2560]``."""
    return patched_forward(_NagRunner(model, negative, params, rows_of, on_call).forward)


ANATOMY = Anatomy(
    "Krea 2",
    "SingleStreamDiT",
    model=("first", "tmlp", "tproj", "txtfusion", "txtmlp", "last", "pe_embedder", "_unpack_context", "patch", "tdim", "channels"),
    blocks="blocks",
    block=(
        "mod", "prenorm", "postnorm", "mlp", "attn.wq", "attn.wk", "attn.wv", "attn.gate", "attn.qknorm", "attn.wo", "attn.heads",
        "attn.kvheads",
    ),
    host=("apply_rope", "attention_function", "timestep_embedding", "pad_to_patch_size"),
)  # fmt: skip


class KreaPass(RunnerPass):
    """NAG on a Krea 2 model for one sampling pass; the NAG negative is encoded as the engine encodes a
    negative prompt."""

    runner = _NagRunner
    encodes_as_negative_prompt = True

    def hooked_text(self, model: torch.nn.Module) -> str:
        return f"{len(model.blocks)} single-stream blocks"


FAMILY = ModelFamily(ANATOMY.family, {FORGE: KreaPass}, ANATOMY.recognises, ANATOMY.unsupported)
