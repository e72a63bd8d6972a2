"""When guidance runs: the start/end window, in fractions of a pass's sampling steps."""

from __future__ import annotations

import math

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
