"""Mirrors modules/sd_samplers_kdiffusion.py (v1.10.1) with two k-diffusion samplers, Euler and Heun.

``CompVisDenoiser``, ``sample_euler`` and ``sample_heun`` are small re-implementations of the
k-diffusion (MIT) ``external.CompVisDenoiser`` and ``sampling.sample_euler/heun`` with ``s_churn = 0``.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from modules import sd_samplers_cfg_denoiser, sd_samplers_common, shared
from modules.sd_samplers_common import SamplerData, setup_img2img_steps
from modules.shared import opts


class CompVisDenoiser(torch.nn.Module):
    """k-diffusion external.CompVisDenoiser: eps model → denoiser, ``x + eps * -sigma`` with ``c_in = 1/√(σ²+1)``."""

    def __init__(self, model, quantize: bool = False):
        super().__init__()
        self.inner_model = model
        alphas_cumprod = model.alphas_cumprod.float()
        self.register_buffer("sigmas", ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5)
        self.register_buffer("log_sigmas", self.sigmas.log())
        self.quantize = quantize

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Interpolate the (fractional) timestep of each sigma in log-sigma space."""
        log_sigma = sigma.log()
        dists = log_sigma - self.log_sigmas[:, None]
        if self.quantize:
            return dists.abs().argmin(dim=0).view(sigma.shape)
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=self.log_sigmas.shape[0] - 2)
        low, high = self.log_sigmas[low_idx], self.log_sigmas[low_idx + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * (low_idx + 1)).view(sigma.shape)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """``n`` sigmas uniform in timestep from 999 down to 0, then a final 0."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n, device=self.sigmas.device)
        return torch.cat([self.t_to_sigma(t), t.new_zeros([1])])

    def forward(self, input, sigma, **kwargs):
        c_in = (1 / (sigma**2 + 1) ** 0.5)[:, None, None, None]
        eps = self.inner_model.apply_model(input * c_in, self.sigma_to_t(sigma), **kwargs)
        return input + eps * -sigma[:, None, None, None]


def _to_d(x, sigma, denoised):
    return (x - denoised) / sigma


@torch.no_grad()
def sample_euler(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion sampling.sample_euler (s_churn = 0): one model call per step."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = x + _to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_heun(model, x, sigmas, extra_args=None, callback=None, disable=None):
    """k-diffusion sampling.sample_heun (s_churn = 0): two model calls per step, one on the last (σ → 0)."""
    extra_args, s_in = extra_args or {}, x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **extra_args)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        d, dt = _to_d(x, sigmas[i], denoised), sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = _to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in, **extra_args))
            x = x + (d + d_2) / 2 * dt
    return x


class CFGDenoiserKDiffusion(sd_samplers_cfg_denoiser.CFGDenoiser):
    """Mirrors sd_samplers_kdiffusion.CFGDenoiserKDiffusion (v1.10.1): the wrapper is built lazily."""

    @property
    def inner_model(self):
        if self.model_wrap is None:
            create_denoiser = getattr(shared.sd_model, "create_denoiser", None)
            self.model_wrap = (
                create_denoiser() if create_denoiser is not None else CompVisDenoiser(shared.sd_model, quantize=opts.enable_quantization)
            )
        return self.model_wrap


class KDiffusionSampler(sd_samplers_common.Sampler):
    """Mirrors sd_samplers_kdiffusion.KDiffusionSampler (v1.10.1), "Automatic" schedule only."""

    func_options: ClassVar[dict] = {"disable": False}

    def __init__(self, funcname, sd_model, options=None):
        super().__init__(funcname)
        self.options = options or {}
        self.func = funcname if callable(funcname) else globals()[funcname]
        self.model_wrap_cfg = CFGDenoiserKDiffusion(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_sigmas(self, p, steps: int) -> torch.Tensor:
        """Mirrors KDiffusionSampler.get_sigmas (v1.10.1) for samplers without a scheduler option."""
        if p.sampler_noise_scheduler_override:
            return p.sampler_noise_scheduler_override(steps)
        return self.model_wrap.get_sigmas(steps)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        """Mirrors KDiffusionSampler.sample (v1.10.1)."""
        steps = steps or p.steps
        sigmas = self.get_sigmas(p, steps)
        if opts.sgm_noise_multiplier:
            p.extra_generation_params["SGM noise multiplier"] = True
            x = x * torch.sqrt(1.0 + sigmas[0] ** 2.0)
        else:
            x = x * sigmas[0]
        return self._run(p, x, conditioning, unconditional_conditioning, image_conditioning, sigmas, steps)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        """Mirrors KDiffusionSampler.sample_img2img (v1.10.1): start at ``sigma_sched[0]``, run ``t_enc + 1`` steps."""
        steps, t_enc = setup_img2img_steps(p, steps)
        sigma_sched = self.get_sigmas(p, steps)[steps - t_enc - 1 :]
        xi = (
            shared.sd_model.add_noise_to_latent(x, noise, sigma_sched[0])
            if hasattr(shared.sd_model, "add_noise_to_latent")
            else x + noise * sigma_sched[0]
        )
        self.model_wrap_cfg.init_latent = x
        samples = self._run(p, xi, conditioning, unconditional_conditioning, image_conditioning, sigma_sched, t_enc + 1)
        return samples


samplers_k_diffusion = [("Euler", "sample_euler", ["k_euler"], {}), ("Heun", "sample_heun", ["k_heun"], {"second_order": True})]
samplers_data_k_diffusion = [
    SamplerData(label, lambda model, funcname=funcname, options=options: KDiffusionSampler(funcname, model, options), aliases, options)
    for label, funcname, aliases, options in samplers_k_diffusion
]
