"""When guidance runs: the start/end window, in fractions of a pass's sampling steps, and the σ end."""

from __future__ import annotations

import math

import torch

# Absorbs float noise such as 0.3 * 10 == 3.0000000000000004.
_EPSILON = 1e-9


def guided_steps(steps: int, start: float, end: float) -> range:
    """The sampler steps ``i`` of ``steps`` with ``start <= i / steps < end``."""
    first = math.ceil(start * steps - _EPSILON)
    stop = math.ceil(end * steps - _EPSILON)
    return range(max(first, 0), min(stop, steps))


def sampler_step(call_index: int, total_calls: int, calls_per_step: int) -> tuple[int, int]:
    """Map a denoiser call to ``(step, steps)`` of the sampler.

    A1111 counts denoiser calls, and its second-order samplers (Heun, DPM2, …) call the
    denoiser twice per step with the call total doubled; both calls of one step must get the
    same decision.
    """
    return call_index // calls_per_step, max(1, -(-total_calls // calls_per_step))


# The authors compare float32 σ with ``>=``; schedules hit σ_end exactly (Flux-schnell's second step is
# 0.75), so a value equal to it up to the host's rounding counts as reached.
_SIGMA_TOLERANCE = 1e-6


def above_sigma_end(sigma: float, sigma_end: float) -> bool:
    """Whether a step at ``sigma`` is still guided by a window that ends below ``sigma_end``."""
    return sigma >= sigma_end * (1.0 - _SIGMA_TOLERANCE)


def timestep_sigma(alphas_cumprod: torch.Tensor, timestep: float) -> float:
    """The σ of a (possibly fractional) discrete timestep, ``√((1 − ᾱ)/ᾱ)``, with log ᾱ interpolated
    linearly between the neighbouring timesteps, as UniPC's discrete noise schedule does."""
    log_alphas = alphas_cumprod.detach().double().cpu().log()
    low = min(max(math.floor(timestep), 0), len(log_alphas) - 1)
    high, weight = min(low + 1, len(log_alphas) - 1), timestep - low
    log_alpha = float((1 - weight) * log_alphas[low] + weight * log_alphas[high])
    return math.sqrt(math.expm1(-log_alpha))
