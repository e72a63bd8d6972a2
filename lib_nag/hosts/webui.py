"""What every WebUI host shares: a NAG job's lifecycle, its arguments, the NAG negative
conditioning, infotext and the console report. Imports the WebUI's ``modules`` (the same API in
A1111, Forge, reForge and Neo)."""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import params as nag_params
from ..attention import CrossAttentionNag, NegativeKV
from ..params import NagParamError, NagParams
from ..schedule import guided_steps, sampler_step

NAG_FORWARD = "_nag_forward"  # marks a forward NAG built to run a whole model (Flux, Chroma, SD3)
OnCall = Callable[[bool, str], None]  # a model call: (guided, why not)
XYZ_ATTRIBUTE = "nag_xyz"
JOB_ATTRIBUTE = "nag_job"
CONSOLE_PREFIX = "[NAG]"


def set_xyz_override(p: Any, name: str, value: Any) -> None:
    """Override one field for an XYZ cell. XYZ cells are shallow copies of one ``p``, so the
    dict is replaced, never edited in place."""
    setattr(p, XYZ_ATTRIBUTE, {**getattr(p, XYZ_ATTRIBUTE, {}), name: value})


def write_infotext(p: Any, params: NagParams | None) -> None:
    """Put NAG's entries in the image parameters, or take them out. XYZ cells share one
    ``extra_generation_params`` dict, so a new dict is assigned."""
    ours = set(nag_params.to_infotext(nag_params.DEFAULTS))
    if params is None and not ours & p.extra_generation_params.keys():
        return  # a job without NAG keeps the host's dict as it is
    kept = {k: v for k, v in p.extra_generation_params.items() if k not in ours}
    p.extra_generation_params = {**kept, **(nag_params.to_infotext(params) if params else {})}


def infotext_has_nag(entries: dict) -> bool:
    """The enable control's paste field: on when the pasted parameters carry NAG, off otherwise."""
    return nag_params.label("scale") in entries


@dataclass
class PassReport:
    """What NAG did in one sampling pass: ``guided`` holds the steps in which it guided at least one
    call (a cross-attention call, or a model call where NAG runs the whole model: ``unit``). Of the
    ``calls`` inside the window, ``placed`` count those whose rows were matched to the CFG batch and
    carry a positive prompt, ``unplaced`` those whose rows could not be matched. ``hooked`` says what
    NAG hooked."""

    is_hires: bool
    steps: int = 0
    window: int = 0
    guided: set[int] = field(default_factory=set)
    guided_calls: int = 0
    calls: int = 0
    placed: int = 0
    unplaced: int = 0
    layers: int = 0
    hooked: str = ""
    unit: str = "cross-attention calls"
    skipped: str = ""
    why_unplaced: set[str] = field(default_factory=set)

    @property
    def name(self) -> str:
        return "hires pass" if self.is_hires else "first pass"

    def count_call(self, placed: bool, positive: bool, why: str = "") -> None:
        """Count a call inside the window; ``why`` a call was not placed, if not for the rows."""
        self.calls += 1
        self.placed += placed and positive
        self.unplaced += not placed
        if not placed:
            self.why_unplaced.add(why or UNPLACED)


UNPLACED = "another extension calls the UNet with its own batches, tiles or row order"


@dataclass
class JobReport:
    """What NAG did in one job, over all its batches; printed as one console line."""

    model: str = ""
    passes: dict[bool, PassReport] = field(default_factory=dict)
    error: str = ""

    def pass_report(self, is_hires: bool) -> PassReport:
        return self.passes.setdefault(is_hires, PassReport(is_hires))

    def guided_calls(self) -> int:
        return sum(p.guided_calls for p in self.passes.values())

    def line(self) -> str:
        if self.error:
            return f"{CONSOLE_PREFIX} invalid arguments, job stopped: {self.error}"
        ran = [p for p in self.passes.values() if not p.skipped]
        if not ran:
            reasons = sorted({p.skipped for p in self.passes.values()}) or ["no sampling pass ran"]
            return f"{CONSOLE_PREFIX} skipped: {'; '.join(reasons)}"
        if not self.guided_calls():
            return f"{CONSOLE_PREFIX} not applied on {self.model}: {self.not_applied_reason(ran)}"
        parts = [f"{p.name} {len(p.guided)}/{p.steps} steps guided ({p.guided_calls} {p.unit})" for p in ran]
        hooked = ran[-1].hooked or f"{max(p.layers for p in ran)} cross-attention layers hooked"
        line = f"{CONSOLE_PREFIX} active on {self.model}: {', '.join(parts)}, {hooked}"
        unplaced = sum(p.unplaced for p in ran)
        if unplaced:
            line += f"; {unplaced} of {unplaced + sum(p.placed for p in ran)} calls not guided ({why_unplaced(ran)})"
        return line

    @staticmethod
    def not_applied_reason(ran: list[PassReport]) -> str:
        placed, unplaced = sum(p.placed for p in ran), sum(p.unplaced for p in ran)
        if unplaced:
            return f"{placed} of {placed + unplaced} {ran[-1].unit} could be placed in the CFG batch ({why_unplaced(ran)})"
        if not any(p.window for p in ran):
            return "no sampling step fell inside the NAG start/end window"
        if not any(p.calls for p in ran):
            return "no hooked cross-attention layer ran (a UNet replacement such as TensorRT bypasses them)"
        return "no cross-attention call carried a positive prompt"


def why_unplaced(passes: list[PassReport]) -> str:
    return "; ".join(sorted(set().union(*(p.why_unplaced for p in passes))))


def model_family(sd_model: Any) -> str:
    for flag, name in (("is_sdxl", "SDXL"), ("is_sd3", "SD3"), ("is_sd2", "SD2"), ("is_sd1", "SD1")):
        if getattr(sd_model, flag, False):
            return name
    return type(sd_model).__name__


def unsupported_reason(sd_model: Any, attn2_count: int) -> str:
    if attn2_count:
        return ""
    family = "SD3" if getattr(sd_model, "is_sd3", False) else model_family(sd_model)
    return f"{family} has no cross-attention (attn2) layers"


def negative_texts(p: Any, params: NagParams, is_hires: bool) -> list[str]:
    """One NAG negative per image of the batch: the NAG box with ``<lora:…>`` tags stripped,
    or, when it is empty, each image's main negative prompt."""
    from modules import extra_networks

    images = p.hr_negative_prompts if is_hires else p.negative_prompts
    if not params.negative_prompt.strip():
        return list(images)
    text, _networks = extra_networks.parse_prompt(params.negative_prompt)
    return [text] * len(images)


def total_steps(sampler_name: str | None, steps: int) -> int:
    """Denoiser calls for ``steps`` of a sampler, as the host counts them for prompt schedules."""
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(sampler_name)
    return config.total_steps(steps) if config else steps


class NegativeConditioning:
    """The NAG negative, encoded by the host's own prompt pipeline (emphasis, embeddings, BREAK,
    chunks, clip skip, prompt scheduling) after extra networks are active, cached with the host's
    own keys. Unlike the host's negatives, an empty prompt is encoded, not zeroed."""

    def __init__(self) -> None:
        self._caches = {False: [None, None], True: [None, None]}

    def encode(self, p: Any, params: NagParams, is_hires: bool) -> list:
        from modules import prompt_parser

        texts = negative_texts(p, params, is_hires)
        # The host's own schedule steps: first-pass total steps, plus the hires total in the hires pass.
        first_pass_steps = total_steps(p.sampler_name, p.steps)
        if is_hires:
            hires_steps = total_steps(getattr(p, "hr_sampler_name", None) or p.sampler_name, p.hr_second_pass_steps or p.steps)
            width, height, networks = p.hr_upscale_to_x, p.hr_upscale_to_y, p.hr_extra_network_data
        else:
            hires_steps, width, height, networks = None, p.width, p.height, p.extra_network_data
        prompts = prompt_parser.SdConditioning(texts, width=width, height=height)
        cache = self._caches[is_hires]
        return p.get_conds_with_caching(prompt_parser.get_learned_conditioning, prompts, first_pass_steps, [cache], networks, hires_steps)

    def forget(self) -> None:
        for cache in self._caches.values():
            cache[:] = [None, None]


def schedule_indices(schedules: list, step: int) -> tuple[int, ...]:
    """Which entry of each image's prompt schedule the host uses at ``step``."""
    return tuple(next((i for i, entry in enumerate(s) if step <= entry.end_at_step), 0) for s in schedules)


def crossattn(cond: Any) -> Any:
    """The cross-attention context of a conditioning (SDXL conds are dicts)."""
    return cond["crossattn"] if isinstance(cond, dict) else cond


def weights_sum_to_one(weights: Sequence[Sequence[float]]) -> bool:
    return all(math.isclose(sum(w), 1.0, rel_tol=0.0, abs_tol=1e-6) for w in weights)


def raise_on_sampling(p: Any, error: NagParamError) -> None:
    """Make the job fail with ``error`` at sampling time: the host swallows exceptions from
    script hooks, but not from ``p.sample``, so the UI and the API report it."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    p.sample = refuse


CROSS_ATTENTION_PARTS = ("to_q", "to_k", "to_v", "to_out")


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


def checkpoint(sd_model: Any) -> Any:
    return getattr(sd_model, "sd_checkpoint_info", None)


def calls_per_step(denoiser: Any) -> int:
    config = getattr(getattr(denoiser, "sampler", None), "config", None)
    return 2 if config is not None and config.options.get("second_order", False) else 1


class NagPass:
    """NAG on one sampling pass, for any host and model: the NAG negative of the pass, the step
    window, and an ``on_cfg_denoiser`` callback registered for the pass alone. A subclass makes the
    pass's guidance (``make_nag``: an object that holds ``negative`` and counts ``guided_calls`` and
    ``missed_calls``), hooks the model (``hook``/``unhook``) and reads each denoiser call (``on_step``)."""

    def __init__(self, job: NagJob, report: PassReport) -> None:
        from modules import script_callbacks, shared

        self.job = job
        self.params: NagParams = job.params
        self.report = report
        self.is_hires = report.is_hires
        self.nag = self.make_nag()
        self.negative: Any = None
        self.negative_key: tuple[int, ...] | None = None
        self.step: int | None = None  # the sampler step of the last denoiser call
        self.guided_before_step = 0
        self.hooked = False
        self.model = shared.sd_model
        self.checkpoint = checkpoint(self.model)
        self.schedules = job.negative.encode(job.p, self.params, self.is_hires)
        try:
            self.hooked = self.hook(self.model)
        except BaseException:
            self.close()  # whatever ``hook`` installed before it failed
            raise
        script_callbacks.on_cfg_denoiser(self.on_cfg_denoiser)

    def make_nag(self) -> Any:
        raise NotImplementedError

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
        if shared.sd_model is not self.model or checkpoint(shared.sd_model) is not self.checkpoint:
            self.follow_model_switch(shared.sd_model)
        step, steps = sampler_step(denoiser.step, denoiser.total_steps, calls_per_step(denoiser))
        window = guided_steps(steps, self.params.start, self.params.end)
        self.settle_step()
        self.step = step
        self.report.steps, self.report.window = steps, len(window)
        active = self.hooked and step in window
        if active:
            self.set_negative(denoiser.step)
        elif self.hooked and step >= window.stop:
            self.unhook()  # past the end step: the host's own attention runs untouched
            self.hooked = False
        self.on_step(params, denoiser, active)

    def set_negative(self, denoiser_step: int) -> None:
        from modules import prompt_parser

        # The host indexes schedules by denoiser call, as for its own conds; the tensor is only
        # rebuilt when the schedule moves, so the K⁻/V⁻ cache holds across steps.
        key = schedule_indices(self.schedules, denoiser_step)
        if key != self.negative_key:
            self.negative = self.nag.negative = self.negative_from(prompt_parser.reconstruct_cond_batch(self.schedules, denoiser_step))
            self.negative_key = key

    def follow_model_switch(self, sd_model: Any) -> None:
        """A refiner switch replaced the model mid-pass (or, with the same architecture, loaded
        new weights into it): move NAG onto its UNet, with the NAG negative encoded by the new
        model."""
        self.unhook()
        self.model = sd_model
        self.checkpoint = checkpoint(sd_model)
        self.schedules = self.job.negative.encode(self.job.p, self.params, self.is_hires)
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

    def __init__(self, job: NagJob, report: PassReport) -> None:
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
    """NAG on a UNet's cross-attention (``attn2``) layers, with the K⁻/V⁻ cache of the pass."""

    def make_nag(self) -> CrossAttentionNag:
        self.kv = NegativeKV()
        return CrossAttentionNag(self.params, self.kv)


class NagJob:
    """One job (one ``p``) with NAG enabled. It lives on ``p`` (``p.nag_job``); the host refers to
    it only while one of its passes has hooks installed."""

    def __init__(self, host: NagHost, p: Any, params: NagParams) -> None:
        self.host = host
        self.p = p
        self.params = params
        self.negative = host.negative
        self.report = JobReport()
        self.pass_: NagPass | None = None
        setattr(p, JOB_ATTRIBUTE, self)
        self.guard_sampling()

    def guard_sampling(self) -> None:
        """``postprocess`` does not run when sampling raises; ``p.sample`` (which holds every
        sampling pass of a batch) always ends the pass, and ends the job if it raises."""
        original = self.p.sample

        def sample(*args: Any, **kwargs: Any) -> Any:
            guided_before = self.report.guided_calls()
            try:
                samples = original(*args, **kwargs)
            except BaseException:
                self.end()
                raise
            finally:
                self.end_pass()
            # The images of this batch carry NAG's parameters only if NAG guided them.
            write_infotext(self.p, self.params if self.report.guided_calls() > guided_before else None)
            return samples

        self.p.sample = self.guard = sample

    def start_pass(self) -> None:
        from modules import shared

        self.end_pass()
        is_hires = bool(getattr(self.p, "is_hr_pass", False))
        report = self.report.pass_report(is_hires)
        if not self.params.guides_pass(is_hires):
            report.skipped = f"{self.params.hires_mode.lower()} mode"
            return
        self.report.model = model_family(shared.sd_model)
        pass_class = self.host.pass_for(shared.sd_model)
        if pass_class is None:
            report.skipped = self.host.unsupported_reason(shared.sd_model)
            return
        try:
            self.pass_ = pass_class(self, report)
        except BaseException as error:  # the host reports the traceback; the console line says why
            report.skipped = f"NAG could not start ({type(error).__name__}: {error})"
            raise
        self.host.live = self
        if self.pass_.hooked:
            report.skipped = ""  # an earlier batch's pass may have failed to start
        else:
            report.skipped = report.skipped or "no cross-attention layer could be hooked"
            self.end_pass()

    def end_pass(self) -> None:
        if self.pass_ is not None:
            self.pass_.close()
            self.pass_ = None
        if self.host.live is self:
            self.host.live = None

    def end(self, report: bool = True) -> None:
        """Undo everything this job installed, and print its console line."""
        from modules import shared

        self.end_pass()
        if self.p.__dict__.get("sample") is self.guard:
            del self.p.sample
        self.p.__dict__.pop(JOB_ATTRIBUTE, None)
        if not shared.opts.persistent_cond_cache:
            self.negative.forget()
        if report:
            print(self.report.line())


class NagHost:
    """The extension's state in one WebUI process."""

    name = ""
    pass_class: type[NagPass]  # NAG on the cross-attention layers of a UNet

    def __init__(self) -> None:
        self.live: NagJob | None = None  # the job whose pass has hooks installed now, if any
        self.negative = NegativeConditioning()

    def unet(self, sd_model: Any) -> torch.nn.Module | None:
        raise NotImplementedError

    def pass_for(self, sd_model: Any) -> type[NagPass] | None:
        """How NAG runs on this model (None: it cannot)."""
        return self.pass_class if attn2_modules(self.unet(sd_model)) else None

    def unsupported_reason(self, sd_model: Any) -> str:
        return unsupported_reason(sd_model, len(attn2_modules(self.unet(sd_model))))

    def start_job(self, p: Any, args: tuple) -> None:
        if self.live is not None:  # a pass installed outside p.sample (A1111 < 1.10) by a job that then failed
            self.live.end(report=False)
        # The script's arguments (UI, API list or API dict), then the XYZ-plot cell's overrides.
        overrides = getattr(p, XYZ_ATTRIBUTE, {})
        try:
            params = nag_params.from_args(args, overrides)
        except NagParamError as error:
            print(JobReport(error=str(error)).line())
            raise_on_sampling(p, error)
            return
        if note := nag_params.ignored_enabled(args, overrides):
            print(f"{CONSOLE_PREFIX} {note}")
        write_infotext(p, None)
        if params.enabled:
            NagJob(self, p, params)

    def start_pass(self, p: Any) -> None:
        job = getattr(p, JOB_ATTRIBUTE, None)
        if job is not None:
            job.start_pass()

    def end_job(self, p: Any) -> None:
        job = getattr(p, JOB_ATTRIBUTE, None)
        if job is not None:
            job.end()

    def unload(self) -> None:
        """The script is being unloaded (UI reload): undo the live job's hooks."""
        if self.live is not None:
            self.live.end(report=False)
