"""A NAG sampling pass, for any host and model family: its NAG negative, its step window, and the
``on_cfg_denoiser`` callback registered for the pass alone. A model family's pass subclasses
``CrossAttentionPass`` (NAG on cross-attention layers) or ``ModelPass`` (NAG runs the whole model),
together with its host's row placement (``a1111_rows``, ``forge_patcher``)."""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable
from typing import Any, Protocol

import torch

from ..attention import CrossAttentionNag, NegativeKV
from ..params import NagParams
from ..schedule import above_sigma_end, guided_steps, sampler_step
from .conditioning import NegativeConditioning, crossattn, schedule_indices
from .report import PassReport

NAG_FORWARD = "_nag_forward"  # marks a forward NAG built to run a whole model (Flux, Chroma, SD3)
OnCall = Callable[[bool, str], None]  # a model call: (guided, why not)
Forward = Callable[..., torch.Tensor]


class Job(Protocol):
    """What a pass reads of its job."""

    p: Any
    params: NagParams
    negative: NegativeConditioning


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """A call's input rows: its first positional argument, or ``x``; None if another extension
    passed them otherwise (then the call is not placed)."""
    x = args[0] if args else kwargs.get("x")
    return x if isinstance(x, torch.Tensor) else None


def reloaded_checkpoint() -> Any:
    """Forge Neo's fast refiner (``refiner_fast_sd``) loads the refiner's weights into the model in
    place, keeping the model, its patcher and its checkpoint info: the filename it then keeps in
    ``sd_samplers_common.ORIGINAL_CHECKPOINT`` tells. None on other hosts, and before the switch."""
    return getattr(sys.modules.get("modules.sd_samplers_common"), "ORIGINAL_CHECKPOINT", None)


def checkpoint(sd_model: Any) -> Any:
    return getattr(sd_model, "sd_checkpoint_info", None)


def calls_per_step(denoiser: Any) -> int:
    config = getattr(getattr(denoiser, "sampler", None), "config", None)
    return 2 if config is not None and config.options.get("second_order", False) else 1


class NagPass:
    """NAG on one sampling pass. A subclass makes the pass's guidance (``make_nag``: an object that
    holds ``negative`` and counts ``guided_calls`` and ``missed_calls``), hooks the model
    (``hook``/``unhook``) and reads each denoiser call (``on_step``). ``encodes_as_negative_prompt``: the
    NAG negative is encoded as the host encodes a negative prompt (not for models whose host zeroes an
    empty negative, which NAG encodes as text)."""

    encodes_as_negative_prompt = False

    def __init__(self, job: Job, report: PassReport) -> None:
        from modules import script_callbacks, shared

        self.job = job
        self.params: NagParams = job.params
        self.report = report
        self.is_hires = report.is_hires
        self.nag = self.make_nag()
        self.negative: Any = None
        self.negative_key: tuple[int, ...] | None = None
        self.step: int | None = None  # the sampler step of the last denoiser call
        self.below_sigma_end = False  # a step's σ fell below NAG sigma end: no more guidance in this pass
        self.guided_before_step = 0
        self.hooked = False
        self.model = shared.sd_model
        self.checkpoint = checkpoint(self.model)
        self.weights_from = reloaded_checkpoint()
        self.schedules = self.encode_negative()
        try:
            self.hooked = self.hook(self.model)
        except BaseException:
            self.close()  # whatever ``hook`` installed before it failed
            raise
        script_callbacks.on_cfg_denoiser(self.on_cfg_denoiser)

    def make_nag(self) -> Any:
        raise NotImplementedError

    def encode_negative(self) -> list:
        return self.job.negative.encode(self.job.p, self.params, self.is_hires, self.encodes_as_negative_prompt)

    def negative_from(self, cond: Any) -> Any:
        """What the guidance needs of the NAG negative's conditioning (by default its context)."""
        return crossattn(cond)

    def hook(self, sd_model: Any) -> bool:
        """Hook the model (and whatever tells ``self.nag`` each call's positive rows); return
        whether anything was hooked."""
        raise NotImplementedError

    def unhook(self) -> None:
        """Remove every hook ``hook`` installed."""
        raise NotImplementedError

    def on_step(self, params: Any, denoiser: Any, active: bool) -> None:
        """Read one denoiser call (``params`` is the host's ``CFGDenoiserParams``)."""
        raise NotImplementedError

    def close(self) -> None:
        from modules import script_callbacks

        script_callbacks.remove_callbacks_for_function(self.on_cfg_denoiser)
        # A1111 1.9.0 keeps a sorted copy that it only rebuilds when the count changes; the next
        # pass's callback would restore the count and revive this one.
        getattr(script_callbacks, "ordered_callbacks_map", {}).pop("cfg_denoiser", None)
        self.unhook()
        self.hooked = False
        self.collect_counts()
        self.negative = self.nag.negative = None

    def collect_counts(self) -> None:
        """Move the guidance's counts into the pass report."""
        self.settle_step()
        self.report.guided_calls += self.nag.guided_calls
        self.report.placed -= self.nag.missed_calls  # placed by the host, yet never seen by a hook
        self.report.unplaced += self.nag.missed_calls
        self.nag.guided_calls = self.nag.missed_calls = self.guided_before_step = 0

    def settle_step(self) -> None:
        """Count the last step as guided if NAG guided a cross-attention call in it."""
        if self.step is not None and self.nag.guided_calls > self.guided_before_step:
            self.report.guided.add(self.step)
        self.guided_before_step = self.nag.guided_calls

    def on_cfg_denoiser(self, params: Any) -> None:
        from modules import shared

        # CFGDenoiserParams.denoiser came with A1111 1.8; before it, the sampler holds the denoiser.
        denoiser = getattr(params, "denoiser", None) or getattr(getattr(self.job.p, "sampler", None), "model_wrap_cfg", None)
        if denoiser is None or getattr(denoiser, "p", None) is not self.job.p:
            return
        if self.model_switched(shared.sd_model):
            self.follow_model_switch(shared.sd_model)
        step, steps = sampler_step(denoiser.step, denoiser.total_steps, calls_per_step(denoiser))
        window = guided_steps(steps, self.params.start, self.params.end)
        self.settle_step()
        if step != self.step and step in window:  # a step's first call decides for the whole step
            self.check_sigma(step, self.call_sigma(params, denoiser))
        self.step = step
        self.report.steps, self.report.window = steps, len(window)
        active = self.hooked and step in window and not self.below_sigma_end
        if active:
            self.set_negative(denoiser.step)
        elif self.hooked and (step >= window.stop or self.below_sigma_end):
            self.unhook()  # past the end step: the host's own attention runs untouched
            self.hooked = False
        self.on_step(params, denoiser, active)

    def call_sigma(self, params: Any, denoiser: Any) -> float:
        """The σ of a denoiser call: one per image, the same for all (A1111 repeats it per row)."""
        sigma = params.sigma
        return float(sigma.reshape(-1)[0]) if isinstance(sigma, torch.Tensor) else float(sigma)

    def check_sigma(self, step: int, sigma: float) -> None:
        """End guidance for the rest of the pass at the first step whose σ is below NAG sigma end."""
        if self.below_sigma_end or above_sigma_end(sigma, self.params.sigma_end):
            return
        self.below_sigma_end = True
        self.report.sigma_stop = f"σ {sigma:.4g} below NAG sigma end {self.params.sigma_end:g} from step {step + 1}"

    def set_negative(self, denoiser_step: int) -> None:
        from modules import prompt_parser

        # The host indexes schedules by denoiser call, as for its own conds; the tensor is only
        # rebuilt when the schedule moves, so the K⁻/V⁻ cache holds across steps.
        key = schedule_indices(self.schedules, denoiser_step)
        if key != self.negative_key:
            self.negative = self.nag.negative = self.negative_from(prompt_parser.reconstruct_cond_batch(self.schedules, denoiser_step))
            self.negative_key = key

    def model_switched(self, sd_model: Any) -> bool:
        """Whether a refiner switch replaced the model (or its checkpoint), or loaded new weights into
        it in place (the NAG negative's K⁻/V⁻ must be projected again), since the pass hooked it."""
        if sd_model is not self.model or checkpoint(sd_model) is not self.checkpoint:
            return True
        return reloaded_checkpoint() != self.weights_from

    def follow_model_switch(self, sd_model: Any) -> None:
        """A refiner switch replaced the model mid-pass (or, with the same architecture, loaded
        new weights into it): move NAG onto its UNet, with the NAG negative encoded by the new
        model."""
        self.unhook()
        self.model = sd_model
        self.checkpoint = checkpoint(sd_model)
        self.weights_from = reloaded_checkpoint()
        self.schedules = self.encode_negative()
        self.collect_counts()
        self.nag = self.make_nag()
        self.negative = self.negative_key = None
        self.hooked = self.hook(sd_model)


def foreign_method(module: torch.nn.Module, name: str, patcher: Any = None) -> bool:
    """Whether another extension replaced ``module.<name>``: an object patch on ``patcher`` (Forge), or
    an instance attribute that is neither NAG's nor the module's own bound method (Forge's unpatch
    sets that back as an instance attribute)."""
    for method in (getattr(patcher, "object_patches", {}).get(f"diffusion_model.{name}"), vars(module).get(name)):
        own = getattr(method, "__func__", None) is getattr(type(module), name, None) and getattr(method, "__self__", None) is module
        if method is not None and not own and not getattr(method, NAG_FORWARD, False):
            return True
    return False


class ModelCalls:
    """The guidance state of a pass that runs the whole model: the NAG negative now, and the model
    calls guided, or not and why."""

    def __init__(self) -> None:
        self.negative: Any = None
        self.guided_calls = 0
        self.missed_calls = 0

    def count(self, report: PassReport) -> OnCall:
        def counted(guided: bool, why: str) -> None:
            report.count_call(guided, guided, why)
            self.guided_calls += guided

        return counted


class ModelPass(NagPass):
    """NAG that runs the whole model (Flux, Chroma, SD3) with a NAG row per positive row: it counts
    model calls and needs the NAG negative's whole conditioning (pooled vectors too)."""

    def __init__(self, job: Job, report: PassReport) -> None:
        report.unit = "model calls"
        super().__init__(job, report)

    def make_nag(self) -> ModelCalls:
        return ModelCalls()

    def negative_from(self, cond: Any) -> Any:
        return cond

    def weak(self, read: Callable[[Any], Any], dead: Any = None) -> Callable[..., Any]:
        """``read(pass)`` while the pass lives, else ``dead``: NAG's forward can outlive the pass (Forge
        unpatches at the next load; another extension may wrap it) and must not keep the job alive."""
        ref = weakref.ref(self)

        def call(*_args: Any) -> Any:
            nag_pass = ref()
            return dead if nag_pass is None else read(nag_pass)

        return call


class CrossAttentionPass(NagPass):
    """NAG on a model's cross-attention layers, with the K⁻/V⁻ cache of the pass."""

    def make_nag(self) -> CrossAttentionNag:
        self.kv = NegativeKV()
        return CrossAttentionNag(self.params, self.kv)
