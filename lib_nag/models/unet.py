"""The UNet family (SD1.x, SD2.x, SDXL and its refiner, inpainting and edit models): NAG on every
cross-attention layer (``*.attn2``), through ``CrossAttentionNag``'s hooks on its ``to_q`` and
out-projection, which whatever computes the attention calls (the host's optimized forward, another
extension's instance ``forward`` such as Regional Prompter's, a Forge replace patch such as its
IP-Adapter's), so NAG composes with all of them and ``Z⁺`` is their output.

Each call's positive rows:
- A1111: ``DenoiserPlacement`` places each UNet call, and a pre-hook on each ``attn2`` announces
  the call's rows;
- Forge: an ``attn2_patch`` on the pass's cloned patcher: the transformer block calls it with the
  normed input and ``extra_options`` just before the attention, which say the call's chunks. The
  K⁻/V⁻ of the NAG negative are projected inside the UNet's forward, through the host's own weight
  casting and offload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..attention import PositiveRows
from ..webui.a1111_rows import DenoiserPlacement, diffusion_model
from ..webui.family import A1111, FORGE, ModelFamily
from ..webui.forge_patcher import ClonedPatcher, positive_chunks, positive_rows
from ..webui.passes import CrossAttentionPass, Job, first_tensor
from ..webui.report import PassReport

CROSS_ATTENTION_PARTS = ("to_q", "to_k", "to_v", "to_out")
NAG_PATCH = "_nag_attn2_patch"  # marks our attn2_patch on the patcher

Attn2Patch = Callable[[torch.Tensor, Any, Any, dict], tuple]


def attn2_modules(unet: torch.nn.Module | None) -> list[tuple[str, torch.nn.Module]]:
    """The cross-attention modules of an SD/SDXL UNet: named ``*.attn2`` (the class differs by host
    and by attention backend) and built of ``to_q``/``to_k``/``to_v``/``to_out`` (SD3.5 Medium's
    MMDiT-X has self-attention modules named ``attn2`` too)."""
    if unet is None:
        return []
    return [
        (name, module)
        for name, module in unet.named_modules()
        if name.endswith(".attn2") and all(hasattr(module, part) for part in CROSS_ATTENTION_PARTS)
    ]


def has_cross_attention(unet: torch.nn.Module) -> bool:
    return bool(attn2_modules(unet))


class A1111UNetPass(DenoiserPlacement, CrossAttentionPass):
    """NAG on a UNet's cross-attention layers in A1111."""

    def hook(self, sd_model: Any) -> bool:
        unet = diffusion_model(sd_model)
        attn2 = [module for _name, module in attn2_modules(unet)]
        self.report.layers = len(attn2)
        if not attn2:
            return False
        self.nag.install(attn2)
        self.place_model_calls(unet)
        for module in attn2:
            self.handles.append(module.register_forward_pre_hook(self.begin_attention, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self.end_attention))
        self.attn2 = attn2
        return True

    def unhook(self) -> None:
        self.nag.remove()
        self.remove_handles()

    def begin_attention(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = first_tensor(args, kwargs)
        call = self.unet_call
        if self.layout is None or not self.layout.active or x is None:
            self.nag.begin_call(x, None)
            return
        placed = call is not None and call.placed and x.shape[0] == call.rows
        self.report.count_call(placed, placed and call.positive is not None)
        self.nag.begin_call(x, call.positive if placed else None)

    def end_attention(self, *_args: Any) -> None:
        self.nag.end_call()


def without_our_patches(patcher: Any) -> None:
    """Drop attn2 patches an earlier NAG pass left on ``patcher`` (Forge Classic starts a hires pass
    from the first pass's patched UNet when no LoRA is active)."""
    patches = patcher.model_options.get("transformer_options", {}).get("patches", {})
    if "attn2_patch" in patches:
        patches["attn2_patch"] = [p for p in patches["attn2_patch"] if not getattr(p, NAG_PATCH, False)]


class ForgeUNetPass(ClonedPatcher, CrossAttentionPass):
    """NAG on a UNet's cross-attention layers in the Forge family."""

    def __init__(self, job: Job, report: PassReport) -> None:
        self.rows: dict[tuple, PositiveRows | None] = {}  # per (cond_or_uncond, rows, device)
        super().__init__(job, report)

    def positive(self, cond_or_uncond: list[int], rows: int, device: torch.device) -> PositiveRows | None:
        key = (tuple(cond_or_uncond), rows, device)
        if key not in self.rows:
            self.rows[key] = positive_chunks(cond_or_uncond, rows, device)
        return self.rows[key]

    def hook(self, sd_model: Any) -> bool:
        original = sd_model.forge_objects.unet
        attn2 = [module for _name, module in attn2_modules(original.model.diffusion_model)]
        self.report.layers = len(attn2)
        if not attn2:
            return False
        clone = original.clone()
        without_our_patches(clone)
        clone.set_model_attn2_patch(self.attn2_patch())
        self.nag.install(attn2)
        self.use_clone(sd_model, clone)
        return True

    def unhook(self) -> None:
        self.nag.remove()

    def attn2_patch(self) -> Attn2Patch:
        # A closure, not a bound method: the patcher deep-copies its options on every clone.
        def place_rows(n: torch.Tensor, context: Any, value: Any, extra_options: dict) -> tuple:
            if not self.active:
                self.nag.begin_call(n, None)
                return n, context, value
            placed, positive = positive_rows(n, context, extra_options, self.positive)
            self.report.count_call(placed, positive is not None)
            self.nag.begin_call(n, positive)
            return n, context, value

        setattr(place_rows, NAG_PATCH, True)
        return place_rows


FAMILY = ModelFamily("UNet", {A1111: A1111UNetPass, FORGE: ForgeUNetPass}, has_cross_attention)
