"""A NAG job (one ``p``) from the script's first hook to its last: the arguments, the sampling passes,
the infotext, the console line; and ``NagHost``, the extension's state in one WebUI process, which
picks the model family of the loaded model."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .. import params as nag_params
from ..params import NagParamError, NagParams
from .conditioning import NegativeConditioning
from .family import ModelFamily
from .passes import NagPass
from .report import CONSOLE_PREFIX, JobReport

XYZ_ATTRIBUTE = "nag_xyz"
JOB_ATTRIBUTE = "nag_job"


def set_xyz_override(p: Any, name: str, value: Any) -> None:
    """Override one field for an XYZ cell. XYZ cells are shallow copies of one ``p``, so the
    dict is replaced, never edited in place."""
    setattr(p, XYZ_ATTRIBUTE, {**getattr(p, XYZ_ATTRIBUTE, {}), name: value})


def write_infotext(p: Any, params: NagParams | None) -> None:
    """Put NAG's entries in the image parameters, or take them out. XYZ cells share one
    ``extra_generation_params`` dict, so a new dict is assigned."""
    ours = nag_params.infotext_keys()
    if params is None and not ours & p.extra_generation_params.keys():
        return  # a job without NAG keeps the host's dict as it is
    kept = {k: v for k, v in p.extra_generation_params.items() if k not in ours}
    p.extra_generation_params = {**kept, **(nag_params.to_infotext(params) if params else {})}


def infotext_has_nag(entries: dict) -> bool:
    """The enable control's paste field: on when the pasted parameters carry NAG, off otherwise."""
    return nag_params.label("scale") in entries


def model_name(sd_model: Any) -> str:
    """The model's name on the console line: the host's architecture flag, else its class."""
    for flag, name in (("is_sdxl", "SDXL"), ("is_sd3", "SD3"), ("is_sd2", "SD2"), ("is_sd1", "SD1")):
        if getattr(sd_model, flag, False):
            return name
    return type(sd_model).__name__


def raise_on_sampling(p: Any, error: NagParamError) -> None:
    """Make the job fail with ``error`` at sampling time: the host swallows exceptions from
    script hooks, but not from ``p.sample``, so the UI and the API report it."""

    def refuse(*_args: Any, **_kwargs: Any) -> Any:
        raise error

    p.sample = refuse


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
        self.report.model = model_name(shared.sd_model)
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
    """The extension's state in one WebUI process. A host subclass names its ``kind`` (the key of
    each family's passes), where its diffusion model is, and the model ``families`` it runs, in the
    order they are tried."""

    name = ""
    kind = ""
    families: Sequence[ModelFamily] = ()

    def __init__(self) -> None:
        self.live: NagJob | None = None  # the job whose pass has hooks installed now, if any
        self.negative = NegativeConditioning()

    @staticmethod
    def diffusion_model(sd_model: Any) -> torch.nn.Module | None:
        raise NotImplementedError

    def pass_for(self, sd_model: Any) -> type[NagPass] | None:
        """How NAG runs on this model (None: it cannot)."""
        model = self.diffusion_model(sd_model)
        if model is None:
            return None
        family = next((f for f in self.families if self.kind in f.passes and f.recognises(model)), None)
        return None if family is None else family.passes[self.kind]

    def unsupported_reason(self, sd_model: Any) -> str:
        """Why NAG cannot run on this model, for the console line: a family's reason for a variant it
        does not run (also a family no host runs), else the model and its network named."""
        model = self.diffusion_model(sd_model)
        alike = (f.unsupported(model) for f in self.families if (self.kind in f.passes or not f.passes) and model is not None)
        name = "SD3" if getattr(sd_model, "is_sd3", False) else model_name(sd_model)
        network = "" if model is None else f" ({type(model).__name__})"
        return next((reason for reason in alike if reason), f"NAG does not know the attention layers of {name}{network}")

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
