"""The Wan family: Wan 2.1 and 2.2 text-to-video, image-to-video and text-to-image (a one-frame video)
on Forge Neo, whose ``backend/nn/wan.py`` (read in exo101/sd-webui-forge-neo-v3 @ 5692d2d1, Neo's port of
ComfyUI v0.3.64 ``comfy/ldm/wan/model.py``) runs them all with one ``WanModel``. NAG guides every
block's text cross-attention as the authors' ComfyUI-NAG ``wan/model.py`` (@ ef8a641) does, through
``CrossAttentionNag``'s hooks (``lib_nag.attention``):

- the layers are the blocks' ``cross_attn`` (``WanT2VCrossAttention``/``WanI2VCrossAttention``; the
  self-attention shares their base class, so they are found by name and parts, never by class);
- the query is ``q``'s output, the positive rows then through the layer's own ``norm_q`` (an RMSNorm
  over the whole width, row by row); ``Z⁺`` is the input of ``o``;
- the context every block sees has been through the model's ``text_embedding``; so has the NAG
  negative, once per NAG negative and weights, at the start of a guided model call; per layer
  K⁻ = ``norm_k(k(·))``, V⁻ = ``v(·)``;
- ``Z⁻`` comes from the host's own ``attention_function``, the kernel that computed ``Z⁺``.

Image-to-video (Wan 2.1 I2V/FLF2V: layers with ``k_img``/``v_img``) sums the image-context attention and
the text attention before ``o``. NAG guides only the text part, as issue 16 asks: forward hooks on
the layer's ``norm_k`` and ``v`` keep the call's K⁺/V⁺, the positive rows' text attention ``Zt⁺`` is
computed again with the host's attention function, and ``o`` gets ``S⁺ + NAG(Zt⁺, Zt⁻) − Zt⁺``, the
image part left as the host computed it. The authors guide the image part too, with its own
normalisation; with CLIP-vision features (their setting) that is an identity (both rows see the same
image), but Neo never passes them, so its "image" part attends over the text context through
``k_img``/``v_img``, which the authors would guide with the NAG negative as well. Wan 2.2's I2V
experts have no ``img_emb``: their layers are T2V ones.

A video is one batch row (the latent ``[1, 16, T, H/8, W/8]``); NAG works per token over all heads,
the tokens of every frame alike. Neo's batch-size field counts frames, so its negative prompts hold a
copy per frame: the NAG negative keeps the first, as the host's conditioning does. Rows come from
``HookedLayerRows`` (Wan calls no attention patch). Wan 2.2's fast refiner loads the low-noise expert
into the same modules: ``HookedLayerRows`` then hooks anew, and K⁻/V⁻ follow the new weights.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from ..attention import CrossAttentionLayer, PositiveRows, weights_state
from ..webui.conditioning import crossattn
from ..webui.family import FORGE, ModelFamily
from ..webui.forge_patcher import HookedLayerRows
from ..webui.passes import CrossAttentionPass

CROSS_ATTENTION_PARTS = ("q", "k", "v", "o", "norm_q", "norm_k")
IMAGE_PARTS = ("k_img", "v_img", "norm_k_img")  # Wan 2.1 I2V's image-context branch

HostAttention = Callable[..., torch.Tensor]


def cross_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks' text cross-attention modules (``blocks.N.cross_attn``)."""
    return [
        module
        for name, module in model.named_modules()
        if name.endswith(".cross_attn") and all(hasattr(module, part) for part in CROSS_ATTENTION_PARTS) and hasattr(module, "num_heads")
    ]


def is_wan(model: Any) -> bool:
    """A ``WanModel``: patch and text embeddings, and a Wan cross-attention in every block."""
    blocks = getattr(model, "blocks", None)
    if not (isinstance(model, torch.nn.Module) and hasattr(model, "text_embedding") and hasattr(model, "patch_embedding") and blocks):
        return False
    return len(cross_attention_layers(model)) == len(blocks)


def _attend(host: Any) -> HostAttention:
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        return host.attention_function(q, k, v, heads=heads)

    return attend


class _TextKV:
    """An image-to-video layer's text-branch K⁺ (``norm_k``'s output) and V⁺ (``v``'s) of the call
    running now, to compute the positive rows' text attention again; dropped when the call ends."""

    def __init__(self, module: torch.nn.Module, attend: HostAttention, handles: list) -> None:
        self.attend, self.heads = attend, module.num_heads
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        handles.append(module.norm_k.register_forward_hook(self.keep_k))
        handles.append(module.v.register_forward_hook(self.keep_v))
        handles.append(module.register_forward_hook(self.drop))

    def keep_k(self, _module: torch.nn.Module, _args: tuple, k: torch.Tensor) -> None:
        self.k = k

    def keep_v(self, _module: torch.nn.Module, _args: tuple, v: torch.Tensor) -> None:
        self.v = v

    def drop(self, *_args: Any) -> None:
        self.k = self.v = None

    def text_part(self, q_positive: torch.Tensor, positive: PositiveRows, rows: int) -> torch.Tensor | None:
        """``Zt⁺`` of the positive rows (None if this call's K⁺/V⁺ are not the rows of its queries)."""
        k, v = self.k, self.v
        if k is None or v is None or k.shape[0] != rows or v.shape[0] != rows:
            return None
        return self.attend(q_positive, positive.take(k), positive.take(v), self.heads)


def layer(module: torch.nn.Module, handles: list) -> CrossAttentionLayer:
    """How NAG reaches one Wan cross-attention layer (an image-to-video one: its text part)."""
    attend = _attend(sys.modules[type(module).__module__])

    def project(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return module.norm_k(module.k(context)), module.v(context)

    text_part = _TextKV(module, attend, handles).text_part if all(hasattr(module, part) for part in IMAGE_PARTS) else None
    return CrossAttentionLayer(
        module, module.q, module.o, module.num_heads, project, (module.k, module.norm_k, module.v), module.norm_q, attend, text_part
    )


class WanPass(HookedLayerRows, CrossAttentionPass):
    """NAG on a Wan model's text cross-attention for one sampling pass."""

    def hook(self, sd_model: Any) -> bool:
        self.embedded: tuple[Any, tuple, torch.Tensor] | None = None  # (NAG negative, its key, text_embedding of it)
        return super().hook(sd_model)

    def layers(self, model: torch.nn.Module) -> list[CrossAttentionLayer]:
        self.text_embedding = model.text_embedding
        return [layer(module, self.handles) for module in cross_attention_layers(model)]

    def negative_from(self, cond: Any) -> torch.Tensor:
        # One latent row per video: the first frame's copy, as Neo's repeat_to_batch_size keeps.
        return crossattn(cond)[:1]

    def negative_for_call(self, context: torch.Tensor) -> torch.Tensor:
        """The NAG negative through the model's ``text_embedding``, in the call's dtype and device (the
        host casts the context so); kept while the negative and the weights stay."""
        negative = self.negative
        key = (context.dtype, context.device, weights_state([self.text_embedding]))
        if self.embedded is None or self.embedded[0] is not negative or self.embedded[1] != key:
            self.embedded = negative, key, self.text_embedding(negative.to(device=context.device, dtype=context.dtype))
        return self.embedded[2]


FAMILY = ModelFamily("Wan", {FORGE: WanPass}, is_wan)
