"""Mirrors modules/sd_samplers_common.py (v1.10.1): sampler configs, refiner switch, the Sampler base."""

from __future__ import annotations

from collections import namedtuple
from typing import ClassVar

import torch

from modules import sd_models, shared
from modules.shared import opts, state


class SamplerData(namedtuple("SamplerData", ["name", "constructor", "aliases", "options"])):
    """Mirrors sd_samplers_common.SamplerData (v1.10.1)."""

    def total_steps(self, steps: int) -> int:
        return steps * 2 if self.options.get("second_order", False) else steps


class InterruptedException(BaseException):
    """Mirrors sd_samplers_common.InterruptedException (v1.10.1): a BaseException, not an Exception."""


def setup_img2img_steps(p, steps=None):
    """Mirrors sd_samplers_common.setup_img2img_steps (v1.10.1): ``(steps, t_enc)``."""
    if opts.img2img_fix_steps or steps is not None:
        requested = steps or p.steps
        steps = int(requested / min(p.denoising_strength, 0.999)) if p.denoising_strength > 0 else 0
        return steps, requested - 1
    return p.steps, int(min(p.denoising_strength, 0.999) * p.steps)


def store_latent(decoded) -> None:
    """Mirrors sd_samplers_common.store_latent (v1.10.1) without the live-preview decode."""
    state.current_latent = decoded


def apply_refiner(cfg_denoiser, sigma=None) -> bool:
    """Mirrors sd_samplers_common.apply_refiner (v1.10.1)."""
    p = cfg_denoiser.p
    if opts.refiner_switch_by_sample_steps or sigma is None:
        completed_ratio = cfg_denoiser.step / cfg_denoiser.total_steps
        p.extra_generation_params["Refiner switch by sampling steps"] = True
    else:
        try:
            timestep = torch.argmin(torch.abs(cfg_denoiser.inner_model.sigmas.to(sigma.device) - torch.max(sigma)))
        except AttributeError:  # timestep samplers: sigma is the timestep
            timestep = torch.max(sigma).to(dtype=int)
        completed_ratio = (999 - timestep) / 1000

    switch_at, info = p.refiner_switch_at, p.refiner_checkpoint_info
    if switch_at is not None and completed_ratio < switch_at:
        return False
    if info is None or shared.sd_model.sd_checkpoint_info == info:
        return False
    if getattr(p, "enable_hr", False):
        second = p.is_hr_pass
        if (opts.hires_fix_refiner_pass == "first pass" and second) or (opts.hires_fix_refiner_pass == "second pass" and not second):
            return False
        if opts.hires_fix_refiner_pass != "second pass":
            p.extra_generation_params["Hires refiner"] = opts.hires_fix_refiner_pass

    p.extra_generation_params["Refiner"] = info.short_title
    p.extra_generation_params["Refiner switch at"] = switch_at
    with sd_models.SkipWritingToConfig():
        sd_models.reload_model_weights(info=info)
    p.setup_conds()
    cfg_denoiser.update_inner_model()
    return True


class Sampler:
    """Mirrors sd_samplers_common.Sampler (v1.10.1)."""

    func_options: ClassVar[dict] = {}

    def __init__(self, funcname):
        self.funcname = self.func = funcname
        self.extra_params: list[str] = []
        self.stop_at = self.eta = self.config = self.last_latent = self.s_min_uncond = None
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = 0.0, 0.0, float("inf"), 1.0
        self.eta_option_field, self.eta_default = "eta_ancestral", 1.0
        self.conditioning_key = getattr(shared.sd_model.model, "conditioning_key", "crossattn")
        self.p = self.model_wrap_cfg = self.sampler_extra_args = None
        self.options: dict = {}

    def callback_state(self, d: dict) -> None:
        """Mirrors Sampler.callback_state (v1.10.1): ``state.sampling_step`` follows the sampler's ``i``."""
        step = d["i"]
        if self.stop_at is not None and step > self.stop_at:
            raise InterruptedException
        state.sampling_step = step
        shared.total_tqdm.update()

    def launch_sampling(self, steps: int, func):
        """Mirrors Sampler.launch_sampling (v1.10.1): an interrupt returns ``last_latent``."""
        self.model_wrap_cfg.steps = steps
        self.model_wrap_cfg.total_steps = self.config.total_steps(steps)
        state.sampling_steps, state.sampling_step = steps, 0
        try:
            return func()
        except RecursionError:
            print("Encountered RecursionError during sampling, returning last latent.")
            return self.last_latent
        except InterruptedException:
            return self.last_latent

    def initialize(self, p) -> dict:
        """Mirrors Sampler.initialize (v1.10.1) without sampler-specific extra kwargs."""
        self.p = self.model_wrap_cfg.p = p
        self.model_wrap_cfg.mask = p.mask if hasattr(p, "mask") else None
        self.model_wrap_cfg.nmask = p.nmask if hasattr(p, "nmask") else None
        self.model_wrap_cfg.step = 0
        self.model_wrap_cfg.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.eta = p.eta if p.eta is not None else getattr(opts, self.eta_option_field, 0.0)
        self.s_min_uncond = getattr(p, "s_min_uncond", 0.0)
        return {}

    def add_infotext(self, p) -> None:
        """Mirrors Sampler.add_infotext (v1.10.1)."""
        if self.model_wrap_cfg.padded_cond_uncond:
            p.extra_generation_params["Pad conds"] = True
        if self.model_wrap_cfg.padded_cond_uncond_v0:
            p.extra_generation_params["Pad conds v0"] = True

    def _run(self, p, x, conditioning, unconditional_conditioning, image_conditioning, schedule, steps):
        """What both sampler kinds' ``sample`` and ``sample_img2img`` do (v1.10.1 writes it out in each):
        the extra args, then ``func(model_wrap_cfg, x, schedule)`` (σs or timesteps) under
        ``launch_sampling`` with the sampler kind's ``func_options``, then the infotext."""
        self.initialize(p)
        self.last_latent = x
        self.sampler_extra_args = {
            "cond": conditioning,
            "image_cond": image_conditioning,
            "uncond": unconditional_conditioning,
            "cond_scale": p.cfg_scale,
            "s_min_uncond": self.s_min_uncond,
        }
        options = {"extra_args": self.sampler_extra_args, "callback": self.callback_state, **self.func_options}
        func = self.func
        samples = self.launch_sampling(steps, lambda: func(self.model_wrap_cfg, x, schedule, **options))
        self.add_infotext(p)
        return samples
