"""AUTOMATIC1111 (1.6–1.10): where the rows of each call stand in the CFG batch, found through
PyTorch hooks, never by replacing a ``forward``. A model family's A1111 pass mixes
``DenoiserPlacement`` into its pass (``passes.NagPass`` has the step window and the NAG negative):
- per denoiser call, the ``on_cfg_denoiser`` callback records the batch layout: cond rows first,
  grouped by image, then uncond (and, for edit models, image-only rows);
- a pre-hook on the denoiser's inner model (the k-diffusion / timestep wrapper) finds which rows of
  ``x_in`` each call carries: every call the host makes passes a view of ``x_in`` (``x_in``,
  ``x_in[a:b]``, ``x_in[-n:]``), so the view's storage offset gives its first row; at CFG 1 it
  runs the cond rows only when the uncond rows cannot change the image;
- a pre-hook on the model the family guides (``place_model_calls``: the UNet, the MMDiT) places
  each of its calls in that denoiser call: the same rows, or (tiled diffusion) whole copies of them
  one after another; a call it cannot place is not guided, and counted, so the console can say so.
Everything is undone at the end of the pass by removing the hooks' handles.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import PositiveRows, repeats_with_period, row_offset
from ..schedule import timestep_sigma
from .conditioning import crossattn
from .passes import Job, first_tensor, foreign_method
from .report import PassReport


def diffusion_model(sd_model: Any) -> torch.nn.Module | None:
    """The model A1111 samples with: the UNet (``DiffusionWrapper``/``OpenAIWrapper``'s), or SD3's MMDiT."""
    return getattr(getattr(sd_model, "model", None), "diffusion_model", None)


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


def host_cond_rows(denoiser: Any) -> torch.Tensor | None:
    """The cond rows the host builds for this step, in its order, before any callback edits them."""
    from modules import prompt_parser

    cond = (getattr(getattr(denoiser, "sampler", None), "sampler_extra_args", None) or {}).get("cond")
    if getattr(cond, "batch", None) is None:
        return None
    return crossattn(prompt_parser.reconstruct_multicond_batch(cond, denoiser.step)[1])


def call_context(kwargs: dict) -> torch.Tensor | None:
    """The cross-attention context of an inner-model call (``cond=`` as ldm or sgm dicts)."""
    cond = kwargs.get("cond")
    if not isinstance(cond, dict):
        return None
    if "c_crossattn" in cond:
        return torch.cat(cond["c_crossattn"], 1) if isinstance(cond["c_crossattn"], list) else cond["c_crossattn"]
    return cond.get("crossattn")


def same_prefix(rows: torch.Tensor, expected: torch.Tensor) -> bool:
    """Whether context rows carry the expected texts (padding may lengthen either side)."""
    tokens = min(rows.shape[1], expected.shape[1])
    return rows.shape[0] == expected.shape[0] and torch.equal(rows[:, :tokens], expected[:, :tokens].to(rows.dtype))


def neighbour_forwards(denoiser: Any, unet: torch.nn.Module | None, attn2: list[torch.nn.Module]) -> bool:
    """Whether another extension runs the denoiser's inner model, the model's ``apply_model``, the
    UNet or an ``attn2`` through its own instance forward (tiled diffusion, ControlNet, Regional
    Prompter, …): those may lay out or split the rows their own way."""
    from modules import shared

    owners = [denoiser.inner_model, unet, *attn2]
    return any(foreign_method(m, "forward") for m in owners if m is not None) or "apply_model" in vars(shared.sd_model)


def weights_sum_to_one(weights: Sequence[Sequence[float]]) -> bool:
    return all(math.isclose(sum(w), 1.0, rel_tol=0.0, abs_tol=1e-6) for w in weights)


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
    unused = cond_scale == 1.0 and weights_sum_to_one(weights) and not is_edit and not reads_uncond_noise
    return unused and only_the_host_reads_uncond(denoiser)


@dataclass
class StepLayout:
    """One denoiser call: the host's callback parameters (read when the inner model runs, so that
    what every callback wrote back counts), the image of each cond row (cond rows lead ``x_in``),
    and the host's own cond rows when per-image NAG negatives make the mapping matter."""

    params: Any
    image_of_row: list[int]
    active: bool
    skip_uncond: bool
    host_cond_rows: torch.Tensor | None

    def cond_rows(self, offset: int, count: int) -> int:
        """How many rows of a call starting at ``offset`` are cond: they always lead."""
        return max(0, min(count, len(self.image_of_row) - offset))

    def positive(self, offset: int, cond_rows: int, device: torch.device) -> PositiveRows | None:
        if not (self.active and cond_rows):
            return None
        rows = list(range(cond_rows))
        return PositiveRows.of(rows, [self.image_of_row[offset + r] for r in rows], device)


@dataclass
class Placement:
    """Where the rows of a call stand: ``rows`` rows, of which ``positive`` are cond; ``placed``
    False when they could not be matched to the CFG batch."""

    rows: int
    positive: PositiveRows | None
    placed: bool = True


class DenoiserPlacement:
    """For an A1111 pass: where the rows of each denoiser call stand in the CFG batch (hooks on the
    denoiser's inner model, and the CFG-1 uncond skip), and those of each call of the model NAG
    works on (``place_model_calls``: the same rows, or whole copies of them)."""

    def __init__(self, job: Job, report: PassReport) -> None:
        self.handles: list[torch.utils.hooks.RemovableHandle] = []  # removed by ``unhook``
        self.inner_handles: list[torch.utils.hooks.RemovableHandle] = []  # removed by ``close``
        self.inner_models: list[torch.nn.Module] = []
        self.layout: StepLayout | None = None
        self.denoiser_call: Placement | None = None
        self.unet_call: Placement | None = None
        self.padded_rows: int | None = None
        self.attn2: list[torch.nn.Module] = []
        self.unet: torch.nn.Module | None = None
        self.denoiser: Any = None
        self.varies: tuple[Any, bool] = (None, False)  # (the NAG negative, whether its images differ)
        super().__init__(job, report)

    def place_model_calls(self, model: torch.nn.Module) -> None:
        self.unet = model
        self.handles.append(model.register_forward_pre_hook(self.place_unet_call, with_kwargs=True))
        self.handles.append(model.register_forward_hook(self.end_unet_call))

    def remove_handles(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def close(self) -> None:
        super().close()
        for handle in self.inner_handles:
            handle.remove()
        self.inner_handles, self.inner_models = [], []
        self.layout = self.denoiser_call = self.unet_call = self.denoiser = None

    def call_sigma(self, params: Any, denoiser: Any) -> float:
        """The call's σ; A1111's timestep samplers (DDIM, PLMS, UniPC) hand a timestep instead."""
        from modules import sd_samplers_timesteps

        sigma = super().call_sigma(params, denoiser)
        if isinstance(denoiser, sd_samplers_timesteps.CFGDenoiserTimesteps):
            return timestep_sigma(denoiser.alphas, sigma)
        return sigma

    def on_step(self, params: Any, denoiser: Any, active: bool) -> None:
        image_of_row, weights = image_rows(denoiser, params.text_cond.shape[0])
        host_rows = host_cond_rows(denoiser) if active and self.negative_varies() else None
        self.layout = StepLayout(params, image_of_row, active, uncond_is_unused(denoiser, weights), host_rows)
        self.denoiser = denoiser
        self.hook_inner_model(denoiser.inner_model)

    def negative_varies(self) -> bool:
        """Whether the images of the batch have different NAG negatives (then each row's image matters);
        worked out once per NAG negative, which changes only when its schedule moves."""
        if self.varies[0] is not self.negative:
            negative = crossattn(self.negative)
            self.varies = (self.negative, negative.shape[0] > 1 and not bool((negative == negative[:1]).all()))
        return self.varies[1]

    def hook_inner_model(self, inner: torch.nn.Module) -> None:
        if inner in self.inner_models:
            return
        self.inner_models.append(inner)
        self.inner_handles.append(inner.register_forward_pre_hook(self.place_denoiser_call, with_kwargs=True))
        self.inner_handles.append(inner.register_forward_hook(self.end_denoiser_call))

    def place_denoiser_call(self, _inner: torch.nn.Module, args: tuple, kwargs: dict) -> tuple | None:
        layout = self.layout
        self.denoiser_call = self.padded_rows = None
        if layout is None or not args or not isinstance(args[0], torch.Tensor):
            return None
        x, x_in = args[0], layout.params.x
        offset = row_offset(x, x_in)
        if offset is None and x.shape[0] == x_in.shape[0]:
            offset = 0  # another extension replaced x after the callbacks; the rows are whole
        if offset is None:
            self.denoiser_call = Placement(x.shape[0], None, placed=False)
            return None
        cond_rows = layout.cond_rows(offset, x.shape[0])
        positive = layout.positive(offset, cond_rows, x.device)
        context = call_context(kwargs)
        if positive is not None and layout.host_cond_rows is not None and context is not None:
            expected = layout.host_cond_rows[offset : offset + cond_rows]
            if not same_prefix(context[:cond_rows], expected):  # rows reordered by another extension
                self.denoiser_call = Placement(x.shape[0], None, placed=False)
                return None
        # Checked as the call runs: another extension may install its forward in a later callback.
        if layout.skip_uncond and 0 < cond_rows < x.shape[0] and not neighbour_forwards(self.denoiser, self.unet, self.attn2):
            # CFG 1: run the cond rows only; the uncond rows come back as zeros, and the host's
            # combine_denoised then gives Σw·c exactly.
            self.padded_rows = x.shape[0]
            args, kwargs = slice_rows((args, kwargs), x.shape[0], cond_rows)
            self.denoiser_call = Placement(cond_rows, positive)
            return args, kwargs
        self.denoiser_call = Placement(x.shape[0], positive)
        return None

    def end_denoiser_call(self, _inner: torch.nn.Module, _args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        padded, self.padded_rows, self.denoiser_call = self.padded_rows, None, None
        if not padded:
            return None
        out = output.new_zeros((padded, *output.shape[1:]))
        out[: output.shape[0]] = output
        return out

    def place_unet_call(self, _unet: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        x = first_tensor(args, kwargs)
        context = kwargs.get("context", args[2] if len(args) > 2 else None)
        call = self.denoiser_call
        if x is None:
            self.unet_call = Placement(0, None, placed=False)
        elif call is None or not call.placed:
            self.unet_call = Placement(x.shape[0], None, placed=False)
        elif x.shape[0] == call.rows:
            self.unet_call = call
        elif isinstance(context, torch.Tensor) and context.shape[0] == x.shape[0] and repeats_with_period(context, call.rows):
            # Tiled diffusion: tiles of the whole denoiser batch, one after another.
            positive = call.positive and call.positive.repeated(x.shape[0] // call.rows, call.rows)
            self.unet_call = Placement(x.shape[0], positive)
        else:
            self.unet_call = Placement(x.shape[0], None, placed=False)

    def end_unet_call(self, *_args: Any) -> None:
        self.unet_call = None
