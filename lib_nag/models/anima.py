"""The Anima family on Forge Neo: a Cosmos-Predict2 DiT (``backend/nn/anima.py``, read in
exo101/sd-webui-forge-neo-v3 @ 5692d2d1; Neo's port of ComfyUI ``comfy/ldm/cosmos/predict2.py``) whose
blocks have a self-attention and a separate text cross-attention (``blocks.N.cross_attn``, a
``SelfCrossAttention`` with ``is_SelfAttn`` False). NAG guides every cross-attention through
``CrossAttentionNag``'s hooks (``lib_nag.attention``):

- the query is ``q_proj``'s output, the positive rows then through the layer's own per-head ``q_norm``
  (heads split as ``(h d)``, as the host does); ``Z⁺`` is the input of ``output_proj``;
- K⁻ = ``k_norm(k_proj(·))`` per head, V⁻ = ``v_norm(v_proj(·))`` (an Identity) of the NAG negative:
  Qwen3-0.6B's hidden states through the LLM adapter, as Neo's own prompt pipeline encodes a prompt
  (one ``[1, L, 1024]`` per prompt, zero-padded to 512 tokens; a batch of them has a token axis of
  one: ``[N, 1, L, 1024]``, which the host's attention folds away, and so does NAG);
- ``Z⁻`` comes from the host's own ``attention_function``.

The authors' ComfyUI-NAG has no Anima code; this follows the rule of their Wan cross-attention
(``wan/model.py`` @ ef8a641): the positive rows' attention output guided against the NAG negative's,
per token over all heads, before the out-projection. A reference latent (Neo's ``anima_do_reference``)
adds frames to the query side only: its tokens are guided with the image's. Rows come from
``HookedLayerRows`` (Anima calls no attention patch).
"""

from __future__ import annotations

import sys
from typing import Any

import torch

from ..attention import CrossAttentionLayer
from ..webui.family import FORGE, ModelFamily
from ..webui.forge_patcher import HookedLayerRows
from ..webui.passes import CrossAttentionPass

CROSS_ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj", "q_norm", "k_norm", "v_norm", "output_proj", "n_heads", "head_dim")


def cross_attention_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks' text cross-attention modules (``blocks.N.cross_attn``, not self-attention)."""
    return [
        module
        for name, module in model.named_modules()
        if name.endswith(".cross_attn")
        and getattr(module, "is_SelfAttn", True) is False
        and all(hasattr(module, part) for part in CROSS_ATTENTION_PARTS)
    ]


def is_anima(model: Any) -> bool:
    """Anima's DiT: time and patch embedders, a final layer, and a text cross-attention in every block."""
    blocks = getattr(model, "blocks", None)
    parts = ("t_embedder", "x_embedder", "final_layer")
    if not (isinstance(model, torch.nn.Module) and all(hasattr(model, part) for part in parts) and blocks):
        return False
    return len(cross_attention_layers(model)) == len(blocks)


def layer(module: torch.nn.Module) -> CrossAttentionLayer:
    """How NAG reaches one Anima cross-attention layer."""
    host = sys.modules[type(module).__module__]

    def per_head(norm: torch.nn.Module, t: torch.Tensor) -> torch.Tensor:
        return norm(t.unflatten(-1, (module.n_heads, module.head_dim))).flatten(-2)

    def query_norm(q: torch.Tensor) -> torch.Tensor:
        return per_head(module.q_norm, q)

    def project(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = context.flatten(1, -2)  # [N, 1, L, C] (a batch of Neo's per-prompt tensors) or [N, L, C]
        return per_head(module.k_norm, module.k_proj(tokens)), per_head(module.v_norm, module.v_proj(tokens))

    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
        return host.attention_function(q, k, v, heads)

    projections = (module.k_proj, module.k_norm, module.v_proj, module.v_norm)
    return CrossAttentionLayer(module, module.q_proj, module.output_proj, module.n_heads, project, projections, query_norm, attend)


class AnimaPass(HookedLayerRows, CrossAttentionPass):
    """NAG on an Anima model's cross-attention for one sampling pass."""

    def layers(self, model: torch.nn.Module) -> list[CrossAttentionLayer]:
        return [layer(module) for module in cross_attention_layers(model)]


FAMILY = ModelFamily("Anima", {FORGE: AnimaPass}, is_anima)
