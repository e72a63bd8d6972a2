"""Mirrors modules/sd_samplers_timesteps.py (v1.10.1) with one timestep sampler, DDIM: the CFG
denoiser of these samplers hands its callbacks and its inner model a timestep where the k-diffusion
samplers hand a σ."""

from __future__ import annotations

import torch

from modules import sd_samplers_common, sd_samplers_timesteps_impl, shared
from modules.sd_samplers_cfg_denoiser import CFGDenoiser
from modules.shared import opts


class CompVisTimestepsDenoiser(torch.nn.Module):
    """Mirrors sd_samplers_timesteps.CompVisTimestepsDenoiser (v1.10.1): the eps model called with timesteps."""

    def __init__(self, model):
        super().__init__()
        self.inner_model = model

    def forward(self, input, timesteps, **kwargs):
        return self.inner_model.apply_model(input, timesteps, **kwargs)


class CFGDenoiserTimesteps(CFGDenoiser):
    """Mirrors sd_samplers_timesteps.CFGDenoiserTimesteps (v1.10.1): ``alphas`` is the model's
    ``alphas_cumprod``; ``sigma`` is a timestep."""

    def __init__(self, sampler):
        super().__init__(sampler)
        self.alphas = shared.sd_model.alphas_cumprod
        self.mask_before_denoising = True

    def get_pred_x0(self, x_in, x_out, sigma):
        a_t = self.alphas[sigma.to(dtype=int)][:, None, None, None]
        return (x_in - (1 - a_t).sqrt() * x_out) / a_t.sqrt()

    @property
    def inner_model(self):
        if self.model_wrap is None:
            self.model_wrap = CompVisTimestepsDenoiser(shared.sd_model)
        return self.model_wrap


class CompVisSampler(sd_samplers_common.Sampler):
    """Mirrors sd_samplers_timesteps.CompVisSampler (v1.10.1) for eps models, without extra noise."""

    def __init__(self, funcname, sd_model):
        super().__init__(funcname)
        self.eta_option_field, self.eta_default = "eta_ddim", 0.0
        self.model_wrap_cfg = CFGDenoiserTimesteps(self)
        self.model_wrap = self.model_wrap_cfg.inner_model

    def get_timesteps(self, p, steps):
        """Mirrors CompVisSampler.get_timesteps (v1.10.1): ``range(0, 1000, 1000 // steps) + 1``."""
        discard = self.config is not None and self.config.options.get("discard_next_to_last_sigma", False)
        steps += 1 if discard or opts.always_discard_next_to_last_sigma else 0
        return torch.clip(torch.asarray(list(range(0, 1000, 1000 // steps))) + 1, 0, 999)

    def sample(self, p, x, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        steps = steps or p.steps
        return self._run(p, x, conditioning, unconditional_conditioning, image_conditioning, self.get_timesteps(p, steps), steps)

    def sample_img2img(self, p, x, noise, conditioning, unconditional_conditioning, steps=None, image_conditioning=None):
        """Mirrors CompVisSampler.sample_img2img (v1.10.1): noise to ``timesteps[t_enc]``, run ``timesteps[:t_enc]``."""
        steps, t_enc = sd_samplers_common.setup_img2img_steps(p, steps)
        timesteps = self.get_timesteps(p, steps)
        alphas_cumprod = shared.sd_model.alphas_cumprod
        xi = x * torch.sqrt(alphas_cumprod[timesteps[t_enc]]) + noise * torch.sqrt(1 - alphas_cumprod[timesteps[t_enc]])
        self.model_wrap_cfg.init_latent = x
        return self._run(p, xi, conditioning, unconditional_conditioning, image_conditioning, timesteps[:t_enc], t_enc + 1)


samplers_timesteps = [("DDIM", sd_samplers_timesteps_impl.ddim, ["ddim"], {})]
samplers_data_timesteps = [
    sd_samplers_common.SamplerData(label, lambda model, funcname=funcname: CompVisSampler(funcname, model), aliases, options)
    for label, funcname, aliases, options in samplers_timesteps
]
