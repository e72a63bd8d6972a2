"""Mirrors modules/sd_samplers_timesteps_impl.py (v1.10.1): DDIM with eta 0 (the default ``eta_ddim``)."""

from __future__ import annotations

import torch


@torch.no_grad()
def ddim(model, x, timesteps, extra_args=None, callback=None, disable=None, eta=0.0):
    """Mirrors sd_samplers_timesteps_impl.ddim (v1.10.1) for eta 0: ``len(timesteps) − 1`` model calls,
    from the last timestep down, each with the timestep (not a σ) as the denoiser's "sigma"."""
    alphas_cumprod = model.inner_model.inner_model.alphas_cumprod
    alphas = alphas_cumprod[timesteps]
    alphas_prev = alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].to(torch.float64)
    extra_args = {} if extra_args is None else extra_args
    s_in, s_x = x.new_ones(x.shape[0]), x.new_ones((x.shape[0], 1, 1, 1))
    for i in range(len(timesteps) - 1):
        index = len(timesteps) - 1 - i
        e_t = model(x, timesteps[index].item() * s_in, **extra_args)
        a_t, a_prev = alphas[index].item() * s_x, alphas_prev[index].item() * s_x
        pred_x0 = (x - (1 - a_t).sqrt() * e_t) / a_t.sqrt()
        x = a_prev.sqrt() * pred_x0 + (1.0 - a_prev).sqrt() * e_t
        if callback is not None:
            callback({"x": x, "i": i, "sigma": 0, "sigma_hat": 0, "denoised": pred_x0})
    return x
