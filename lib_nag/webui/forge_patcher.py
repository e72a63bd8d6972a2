"""The Forge family (Forge 2, reForge, Forge Classic, Forge Neo): where the rows of each model call
stand, and the pass's own clone of the UNet patcher.

- Rows: Forge batches a call in chunks labelled by ``transformer_options["cond_or_uncond"]`` (0: cond),
  in any order; the positive rows are the cond chunks' rows, in a batch of exactly those chunks or in
  whole copies of it (Forge's integrated MultiDiffusion tiles). Rows that cannot be placed are not
  guided, and counted.
- ``ClonedPatcher``: a pass samples on its own clone of ``p.sd_model.forge_objects.unet``, put back at
  the end of the pass, and follows the step window (``active``).
- ``ForgeModelPass``: NAG that runs the whole model, as an object patch of its entry point on that clone.
- ``HookedLayerRows``: for cross-attention layers that get no ``attn2_patch`` (Wan, Anima): the rows of
  each model call, from a pre-hook on the diffusion model, announced by a pre-hook on each layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ..attention import CrossAttentionLayer, PositiveRows, repeats_with_period
from .passes import Forward, Job, ModelPass, OnCall, first_tensor, foreign_method
from .report import PassReport

COND = 0  # cond_or_uncond label of a positive chunk


def diffusion_model(sd_model: Any) -> torch.nn.Module | None:
    """The model inside the UNet patcher Forge samples with."""
    patcher = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
    return getattr(getattr(patcher, "model", None), "diffusion_model", None)


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
RowsOf = Callable[[torch.Tensor, torch.Tensor, dict[str, Any]], PositiveRows | None]  # (x, context, other keyword arguments)


def positive_rows(n: torch.Tensor, context: Any, extra_options: dict, chunks: Chunks = positive_chunks) -> tuple[bool, PositiveRows | None]:
    """Whether the rows of ``n`` could be placed (see ``place``), and which are positive."""
    placed, copies = place(n, context, extra_options)
    if not placed:
        return False, None
    period = n.shape[0] // copies
    positive = chunks(extra_options["cond_or_uncond"], period, n.device)
    return True, positive.repeated(copies, period) if positive is not None and copies > 1 else positive


def forge_rows(is_active: Callable[[dict], bool], on_call: OnCall | None = None) -> RowsOf:
    """Forge's positive rows: the cond chunks of ``transformer_options["cond_or_uncond"]`` (whole
    copies of the batch too), while ``is_active(transformer_options)``; ``on_call`` is told of an
    active call whose rows could not be placed."""

    def rows_of(x: torch.Tensor, context: torch.Tensor, kwargs: dict[str, Any]) -> PositiveRows | None:
        options = kwargs.get("transformer_options") or {}
        if not is_active(options):
            return None
        placed, positive = positive_rows(x, context, options)
        if not placed and on_call is not None:
            on_call(False, "")
        return positive

    return rows_of


class ClonedPatcher:
    """For a pass that samples on its own clone of ``forge_objects.unet`` (put back at the end, if
    the host has not already replaced it) and follows the step window (``active``)."""

    def __init__(self, job: Job, report: PassReport) -> None:
        self.active = False
        self.patched: list[tuple[Any, Any, Any]] = []  # (sd_model, our clone, the patcher it replaced)
        super().__init__(job, report)

    def use_clone(self, sd_model: Any, clone: Any) -> None:
        self.patched.append((sd_model, clone, sd_model.forge_objects.unet))
        sd_model.forge_objects.unet = clone

    def close(self) -> None:
        super().close()
        self.active = False  # a clone another extension copied from ours may outlive the pass
        for sd_model, clone, original in reversed(self.patched):  # a clone of an earlier clone goes first
            if sd_model.forge_objects.unet is clone:
                sd_model.forge_objects.unet = original
        self.patched = []

    def on_step(self, params: Any, denoiser: Any, active: bool) -> None:
        self.active = active


class ForgeModelPass(ClonedPatcher, ModelPass):
    """NAG that runs the whole model on Forge: the pass's clone of the patcher carries an object patch
    of the model's entry point (``nag_forward``); Forge sets it when it loads the patcher for sampling
    and sets back what was there when it unloads it, so nothing stays on the model. Outside the
    window the patched method runs the model's own. NAG stands aside if another extension replaced
    that method."""

    def entry_point(self, model: torch.nn.Module) -> str:
        return "forward"

    def nag_forward(self, model: torch.nn.Module) -> Forward:
        raise NotImplementedError

    def hooked_text(self, model: torch.nn.Module) -> str:
        raise NotImplementedError

    def hook(self, sd_model: Any) -> bool:
        original = sd_model.forge_objects.unet
        model = original.model.diffusion_model
        entry = self.entry_point(model)
        if any(foreign_method(model, name, original) for name in dict.fromkeys(("forward", entry))):
            self.report.skipped = f"another extension replaces the {type(model).__name__} forward, which NAG would have to run"
            return False
        clone = original.clone()
        clone.add_object_patch(f"diffusion_model.{entry}", self.nag_forward(model))
        self.report.hooked = self.hooked_text(model)
        self.use_clone(sd_model, clone)
        return True

    def unhook(self) -> None:
        self.active = False


class HookedLayerRows:
    """For a cross-attention pass (``passes.CrossAttentionPass``) on a Forge model whose layers get no
    ``attn2_patch`` (Wan, Anima): a forward pre-hook on the diffusion model reads each call's
    ``transformer_options`` and places its rows (the cond chunks of ``cond_or_uncond``, as
    ``positive_rows``); a pre-hook on each layer starts the layer's call with them (``begin_call``),
    a forward hook ends it. Outside the step window (``active``) every call runs as the host's. Hooks
    only, on the model itself: nothing is patched on the patcher, and ``unhook`` leaves nothing."""

    def __init__(self, job: Job, report: PassReport) -> None:
        self.active = False
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.model_call: tuple[bool, PositiveRows | None] | None = None  # (placed, positive rows) of an active call
        super().__init__(job, report)

    def layers(self, model: torch.nn.Module) -> Sequence[CrossAttentionLayer]:
        """The model's cross-attention layers, as NAG reaches them."""
        raise NotImplementedError

    def negative_for_call(self, context: torch.Tensor) -> Any:
        """The NAG negative the layers project, for a guided call whose context is ``context``."""
        return self.negative

    def hook(self, sd_model: Any) -> bool:
        model = diffusion_model(sd_model)
        layers = [] if model is None else self.layers(model)
        self.report.layers = len(layers)
        if not layers:
            return False
        self.nag.install(layers)
        self.handles.append(model.register_forward_pre_hook(self.begin_model_call, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self.end_model_call))
        for layer in layers:
            self.handles.append(layer.module.register_forward_pre_hook(self.begin_layer_call, with_kwargs=True))
            self.handles.append(layer.module.register_forward_hook(self.end_layer_call))
        return True

    def unhook(self) -> None:
        self.nag.remove()
        for handle in self.handles:
            handle.remove()
        self.handles = []
        self.model_call = None

    def on_step(self, params: Any, denoiser: Any, active: bool) -> None:
        self.active = active

    def begin_model_call(self, _model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = first_tensor(args, kwargs)
        self.model_call = None
        if not self.active or x is None:
            return
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        placed, positive = positive_rows(x, context, kwargs.get("transformer_options") or {})
        if positive is not None:
            self.nag.negative = self.negative_for_call(context)
        self.model_call = placed, positive

    def end_model_call(self, *_args: Any) -> None:
        self.model_call = None

    def begin_layer_call(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x, call = first_tensor(args, kwargs), self.model_call
        if call is None or x is None:
            self.nag.begin_call(x, None)
            return
        placed, positive = call
        self.report.count_call(placed, positive is not None)
        self.nag.begin_call(x, positive if placed else None)

    def end_layer_call(self, *_args: Any) -> None:
        self.nag.end_call()
