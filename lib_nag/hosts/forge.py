"""The Forge family (Forge 2, reForge, Forge Classic, Forge Neo): NAG through PyTorch hooks, with
each call's rows from an ``attn2_patch``.

Per sampling pass (see ``webui.NagPass`` for the step window and the NAG negative):
- ``CrossAttentionNag`` hooks every ``*.attn2``'s ``to_q`` and out-projection. The transformer
  block calls both as modules whether it runs the module's forward (the host's, or an instance
  forward another extension installed, such as Regional Prompter's) or an attn2 replace patch
  (Forge's IP-Adapter), so NAG composes with all of them and ``Z⁺`` is their output;
- the pass clones ``p.sd_model.forge_objects.unet`` and adds an ``attn2_patch``: the block calls it
  with the normed input and ``extra_options`` just before the attention, and it tells
  ``CrossAttentionNag`` which rows are positive: the chunks that ``cond_or_uncond`` labels cond (0),
  in any order and any chunking, or whole copies of that batch (Forge's integrated MultiDiffusion
  tiles). Rows it cannot place (another patch that regrouped the batch, such as Forge Couple's) are
  not guided, and counted.
The K⁻/V⁻ of the NAG negative are projected inside the UNet's forward, through the host's own
weight casting and offload. The clone is dropped and the hooks removed at the end of the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

import torch

from ..attention import PositiveRows, repeats_with_period
from . import webui

COND = 0  # cond_or_uncond label of a positive chunk
NAG_PATCH = "_nag_attn2_patch"  # marks our attn2_patch on the patcher

Attn2Patch = Callable[[torch.Tensor, Any, Any, dict], tuple]


def positive_chunks(cond_or_uncond: list[int], rows: int, device: torch.device) -> PositiveRows | None:
    """The rows of the chunks labelled cond; chunk ``i`` holds rows ``i·B … (i+1)·B−1`` and row
    ``j`` of every chunk is image ``j`` of the batch."""
    per_chunk = rows // len(cond_or_uncond)
    chunks = [i for i, label in enumerate(cond_or_uncond) if label == COND]
    if not chunks:
        return None
    images = list(range(per_chunk))
    return PositiveRows.of([c * per_chunk + j for c in chunks for j in images], images * len(chunks), device)


def chunk_rows(extra_options: dict) -> int | None:
    """The rows of the batch ``cond_or_uncond`` describes: one per chunk and image."""
    labels = extra_options.get("cond_or_uncond") or []
    sigmas = extra_options.get("sigmas")
    images = sigmas.shape[0] if isinstance(sigmas, torch.Tensor) and sigmas.dim() else None
    return images * len(labels) if labels and images else None


def place(n: torch.Tensor, context: Any, extra_options: dict) -> tuple[bool, int]:
    """Whether the rows of ``n`` are the batch ``cond_or_uncond`` describes, or whole copies of it
    (a tiled-diffusion wrapper's tile-major batch, its context repeated alike), and how many."""
    rows = chunk_rows(extra_options)
    if rows is None:
        return False, 0
    if n.shape[0] == rows:
        return True, 1
    copies = isinstance(context, torch.Tensor) and context.shape[0] == n.shape[0] and repeats_with_period(context, rows)
    return copies, n.shape[0] // rows if copies else 0


Chunks = Callable[[list[int], int, torch.device], PositiveRows | None]


def positive_rows(n: torch.Tensor, context: Any, extra_options: dict, chunks: Chunks = positive_chunks) -> tuple[bool, PositiveRows | None]:
    """Whether the rows of ``n`` could be placed (see ``place``), and which are positive."""
    placed, copies = place(n, context, extra_options)
    if not placed:
        return False, None
    period = n.shape[0] // copies
    positive = chunks(extra_options["cond_or_uncond"], period, n.device)
    return True, positive.repeated(copies, period) if positive is not None and copies > 1 else positive


def without_our_patches(patcher: Any) -> None:
    """Drop attn2 patches an earlier NAG pass left on ``patcher`` (Forge Classic starts a hires pass
    from the first pass's patched UNet when no LoRA is active)."""
    patches = patcher.model_options.get("transformer_options", {}).get("patches", {})
    if "attn2_patch" in patches:
        patches["attn2_patch"] = [p for p in patches["attn2_patch"] if not getattr(p, NAG_PATCH, False)]


class ClonedPatcher:
    """For a pass that samples on its own clone of ``forge_objects.unet`` (put back at the end, if
    the host has not already replaced it) and follows the step window (``active``)."""

    def __init__(self, job: webui.NagJob, report: webui.PassReport) -> None:
        self.active = False
        self.patched: list[tuple[Any, Any, Any]] = []  # (sd_model, our clone, the patcher it replaced)
        super().__init__(job, report)

    def use_clone(self, sd_model: Any, clone: Any) -> None:
        self.patched.append((sd_model, clone, sd_model.forge_objects.unet))
        sd_model.forge_objects.unet = clone

    def close(self) -> None:
        super().close()
        self.active = False  # a clone another extension copied from ours may outlive the pass
        for sd_model, clone, original in self.patched:
            if sd_model.forge_objects.unet is clone:
                sd_model.forge_objects.unet = original
        self.patched = []

    def on_step(self, params: Any, denoiser: Any, active: bool) -> None:
        self.active = active


class ForgeModelPass(ClonedPatcher, webui.ModelPass):
    """NAG that runs the whole model on Forge: the pass's clone of the patcher carries an object patch
    of the model's entry point (``nag_forward``); Forge sets it when it loads the patcher for sampling
    and sets back what was there when it unloads it, so nothing stays on the model. Outside the
    window the patched method runs the model's own. NAG stands aside if another extension replaced
    that method."""

    def entry_point(self, model: torch.nn.Module) -> str:
        return "forward"

    def nag_forward(self, model: torch.nn.Module) -> Callable[..., torch.Tensor]:
        raise NotImplementedError

    def hooked_text(self, model: torch.nn.Module) -> str:
        raise NotImplementedError

    def hook(self, sd_model: Any) -> bool:
        original = sd_model.forge_objects.unet
        model = original.model.diffusion_model
        entry = self.entry_point(model)
        if any(webui.foreign_method(model, name, original) for name in dict.fromkeys(("forward", entry))):
            self.report.skipped = f"another extension replaces the {type(model).__name__} forward, which NAG would have to run"
            return False
        clone = original.clone()
        clone.add_object_patch(f"diffusion_model.{entry}", self.nag_forward(model))
        self.report.hooked = self.hooked_text(model)
        self.use_clone(sd_model, clone)
        return True

    def unhook(self) -> None:
        self.active = False


class ForgePass(ClonedPatcher, webui.CrossAttentionPass):
    def __init__(self, job: webui.NagJob, report: webui.PassReport) -> None:
        self.rows: dict[tuple, PositiveRows | None] = {}  # per (cond_or_uncond, rows, device)
        super().__init__(job, report)

    def positive(self, cond_or_uncond: list[int], rows: int, device: torch.device) -> PositiveRows | None:
        key = (tuple(cond_or_uncond), rows, device)
        if key not in self.rows:
            self.rows[key] = positive_chunks(cond_or_uncond, rows, device)
        return self.rows[key]

    def hook(self, sd_model: Any) -> bool:
        original = sd_model.forge_objects.unet
        attn2 = [module for _name, module in webui.attn2_modules(original.model.diffusion_model)]
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


class ForgeHost(webui.NagHost):
    pass_class = ForgePass

    def __init__(self) -> None:
        super().__init__()
        self.name = forge_variant()

    @staticmethod
    def unet(sd_model: Any) -> torch.nn.Module | None:
        patcher = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
        return getattr(getattr(patcher, "model", None), "diffusion_model", None)

    def pass_for(self, sd_model: Any) -> type[webui.NagPass] | None:
        from .forge_flux import FluxPass, is_flux_family
        from .mmdit import ForgeMMDiTPass, is_mmdit

        model = self.unet(sd_model)
        if is_flux_family(model):
            return FluxPass
        return ForgeMMDiTPass if is_mmdit(model) else super().pass_for(sd_model)

    def unsupported_reason(self, sd_model: Any) -> str:
        from .forge_flux import is_joint_transformer

        model = self.unet(sd_model)
        if is_joint_transformer(model):
            return f"NAG runs Forge's own Flux and Chroma models; this host's {type(model).__name__} is another one, not supported yet"
        return super().unsupported_reason(sd_model)


def forge_variant() -> str:
    """Which Forge, for the start-up line: by what the host ships, not by its name."""
    from modules_forge import forge_version

    if find_spec("backend") is not None:
        return "Forge Neo" if getattr(forge_version, "version", "") == "neo" else "Forge"
    return "reForge" if find_spec("ldm_patched.modules.patcher_extension") is not None else "Forge Classic"
