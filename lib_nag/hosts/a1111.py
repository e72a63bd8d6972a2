"""AUTOMATIC1111 (1.6–1.10): NAG through instance-level wraps of every ``attn2`` forward.

Per sampling pass (see ``webui.NagPass`` for the step window and the NAG negative):
- every module named ``*.attn2`` in the sampling UNet gets an instance ``forward`` that runs
  the host's current class forward, with NAG on the positive rows while guidance is active;
- per denoiser call, the ``on_cfg_denoiser`` callback records the batch layout: cond rows first,
  grouped by image, then uncond (and, for edit models, image-only rows);
- the denoiser's inner model (the k-diffusion / timestep wrapper) gets an instance ``forward``
  that finds which rows of ``x_in`` each UNet call carries: every call the host makes passes a
  view of ``x_in`` (``x_in``, ``x_in[a:b]``, ``x_in[-n:]``), so the view's storage offset
  gives its first row. At CFG 1 it also leaves out the uncond rows.
Everything is undone at the end of the pass.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..attention import PositiveRows, nag_cross_attention
from . import webui

WRAPPED = "_nag_wrapped"  # marks an instance forward installed by this module


def wrap_forward(module: torch.nn.Module, forward: Callable[..., Any]) -> None:
    setattr(forward, WRAPPED, True)
    module.forward = forward


def unwrap_forward(module: torch.nn.Module) -> None:
    if getattr(module.__dict__.get("forward"), WRAPPED, False):
        del module.forward


def row_offset(x: torch.Tensor, base: torch.Tensor) -> int | None:
    """The first row of ``base`` that ``x`` starts at, if ``x`` is a row slice of ``base``."""
    if x.dim() != base.dim() or x.shape[1:] != base.shape[1:] or x.stride() != base.stride() or x.shape[0] > base.shape[0]:
        return None
    if x.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return None
    rows, remainder = divmod(x.storage_offset() - base.storage_offset(), base.stride(0))
    return rows if remainder == 0 and 0 <= rows <= base.shape[0] - x.shape[0] else None


def slice_rows(value: Any, rows: int, keep: int) -> Any:
    """``value`` (tensors, possibly in dicts and lists) with only the first ``keep`` of ``rows`` rows."""
    if isinstance(value, torch.Tensor):
        return value[:keep] if value.dim() and value.shape[0] == rows else value
    if isinstance(value, dict):
        return {k: slice_rows(v, rows, keep) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(slice_rows(v, rows, keep) for v in value)
    return value


def image_rows(denoiser: Any, cond_rows: int) -> tuple[list[int], list[list[float]]]:
    """The image of each cond row and each image's AND weights, from the multicond the sampler
    passes (``conds_list`` order: image 0's sub-prompts, then image 1's, …)."""
    extra = getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", None) or {}
    batch = getattr(extra.get("cond"), "batch", None)
    if batch is None:
        return list(range(cond_rows)), [[1.0]] * cond_rows
    return [image for image, conds in enumerate(batch) for _ in conds], [[c.weight for c in conds] for conds in batch]


def only_the_host_reads_uncond(denoiser: Any) -> bool:
    """No other extension replaced ``combine_denoised`` (Neutral Prompt, Prep-Neg, …) or reads
    the denoiser's rows in a ``cfg_denoised`` callback."""
    from modules import script_callbacks

    combine = getattr(type(denoiser), "combine_denoised", None)
    if "combine_denoised" in vars(denoiser) or getattr(combine, "__module__", "") != "modules.sd_samplers_cfg_denoiser":
        return False
    return not script_callbacks.callback_map.get("callbacks_cfg_denoised")


def uncond_is_unused(denoiser: Any, weights: list[list[float]]) -> bool:
    """At CFG 1 with each image's cond weights summing to 1, the host's ``combine_denoised``
    gives ``u + Σw(c−u) = Σw·c``: the uncond rows cannot change the image. Not for edit models
    (their uncond carries the image CFG), nor when the sampler reads the uncond noise (DDIM
    CFG++), nor when another extension reads the uncond rows."""
    from modules import shared

    extra = denoiser.sampler.sampler_extra_args
    cond_scale = extra.get("cond_scale", 0.0) * getattr(denoiser, "cond_scale_miltiplier", 1.0)
    image_cfg = getattr(denoiser, "image_cfg_scale", None)
    is_edit = getattr(shared.sd_model, "cond_stage_key", None) == "edit" and image_cfg is not None and image_cfg != 1.0
    reads_uncond_noise = getattr(denoiser, "need_last_noise_uncond", False)
    unused = cond_scale == 1.0 and webui.weights_sum_to_one(weights) and not is_edit and not reads_uncond_noise
    return unused and only_the_host_reads_uncond(denoiser)


class StepLayout:
    """The rows of one denoiser call: ``x_in`` as the host passed it to the callback, and the
    image of each cond row (cond rows lead ``x_in``)."""

    def __init__(self, x_in: torch.Tensor, image_of_row: list[int], active: bool, skip_uncond: bool) -> None:
        self.x_in = x_in
        self.image_of_row = image_of_row
        self.active = active
        self.skip_uncond = skip_uncond

    def cond_rows(self, offset: int, count: int) -> int:
        """How many rows of a call starting at ``offset`` are cond: they always lead."""
        return max(0, min(count, len(self.image_of_row) - offset))

    def positive(self, offset: int, cond_rows: int, device: torch.device) -> PositiveRows:
        rows = list(range(cond_rows))
        return PositiveRows.of(rows, [self.image_of_row[offset + r] for r in rows], device)


class A1111Pass(webui.NagPass):
    def __init__(self, job: webui.NagJob, report: webui.PassReport) -> None:
        self.attn2: list[torch.nn.Module] = []
        self.inner_models: list[torch.nn.Module] = []
        self.layout: StepLayout | None = None
        self.current: PositiveRows | None = None
        self.current_batch = 0
        self.warned_unlocated = False
        super().__init__(job, report)

    def hook(self, sd_model: Any) -> bool:
        self.attn2 = [module for _name, module in webui.attn2_modules(A1111Host.unet(sd_model))]
        self.report.layers = len(self.attn2)
        for module in self.attn2:
            wrap_forward(module, self.attn2_forward(module))
        return bool(self.attn2)

    def unhook(self) -> None:
        for module in self.attn2:
            unwrap_forward(module)
        self.attn2 = []

    def close(self) -> None:
        super().close()
        for inner in self.inner_models:
            unwrap_forward(inner)
        self.inner_models = []
        self.layout = self.current = None

    def on_step(self, params: Any, denoiser: Any, active: bool) -> None:
        image_of_row, weights = image_rows(denoiser, params.text_cond.shape[0])
        self.layout = StepLayout(params.x, image_of_row, active, uncond_is_unused(denoiser, weights))
        self.wrap_inner_model(denoiser.inner_model)

    def wrap_inner_model(self, inner: torch.nn.Module) -> None:
        if inner in self.inner_models:
            return
        self.inner_models.append(inner)

        def forward(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
            return self.run_inner(inner, x, args, kwargs)

        wrap_forward(inner, forward)

    def run_inner(self, inner: torch.nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        original = type(inner).forward
        layout = self.layout
        offset = None if layout is None else self.locate(x, layout)
        if offset is None:
            return original(inner, x, *args, **kwargs)
        cond_rows = layout.cond_rows(offset, x.shape[0])
        if layout.skip_uncond and cond_rows < x.shape[0]:
            out = torch.zeros_like(x)  # combine_denoised then gives Σw·c exactly
            if cond_rows:
                sliced_args, sliced_kwargs = slice_rows((args, kwargs), x.shape[0], cond_rows)
                out[:cond_rows] = self.run_inner(inner, x[:cond_rows], sliced_args, sliced_kwargs)
            return out
        self.current = layout.positive(offset, cond_rows, x.device) if layout.active and cond_rows else None
        self.current_batch = x.shape[0]
        try:
            return original(inner, x, *args, **kwargs)
        finally:
            self.current = None

    def locate(self, x: torch.Tensor, layout: StepLayout) -> int | None:
        offset = row_offset(x, layout.x_in)
        if offset is None and x.shape[0] == layout.x_in.shape[0]:
            offset = 0  # another extension replaced x after this callback; the rows are whole
        if offset is None and not self.warned_unlocated:
            self.warned_unlocated = True
            print(f"{webui.CONSOLE_PREFIX} a UNet call's rows could not be placed in the CFG batch; NAG skips such calls")
        return offset

    def attn2_forward(self, module: torch.nn.Module) -> Callable[..., torch.Tensor]:
        def forward(x: torch.Tensor, context: torch.Tensor | None = None, *args: Any, **kwargs: Any) -> torch.Tensor:
            positive = self.current
            if positive is None or args or context is None or x.shape[0] != self.current_batch:
                return type(module).forward(module, x, context, *args, **kwargs)
            return nag_cross_attention(module, x, context, positive, self.negative, self.kv, self.params, **kwargs)

        return forward


class A1111Host(webui.NagHost):
    name = "AUTOMATIC1111"
    pass_class = A1111Pass

    @staticmethod
    def unet(sd_model: Any) -> torch.nn.Module | None:
        return getattr(getattr(sd_model, "model", None), "diffusion_model", None)
