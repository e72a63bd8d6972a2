"""What every benchmark in tests/bench.py shares: the stand-ins on the path, random weights, the FLOP
counter, and interleaved timing with its statistics (the models and their variants are in bench.py,
bench_dit.py and bench_neo.py)."""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "forge", ROOT / "tests" / "a1111"):  # the repository, the stand-ins of Forge's and A1111's code
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from backend.nn.flux import RMSNorm  # noqa: E402
from modules.models.sd3.mmdit import RMSNorm as MMDiTRMSNorm  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

from lib_nag.params import NagParams  # noqa: E402

MIB = 2**20
NAG_PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Elementwise work of the NAG branch, FLOPs per element (see the analytic floors).
NAG_FLOPS_PER_Z = 10  # guided (3), two L1 norms (abs + sum, 4), blend (3)
SOFTMAX_FLOPS_PER_SCORE = 5  # max, subtract, exp, sum, divide


# --- models ------------------------------------------------------------------------------------


def init_weights(unet: nn.Module, seed: int) -> None:
    """PyTorch's default init in distribution (U(±1/√fan_in) for conv/linear weight and bias;
    norms 1 and 0), also for ldm's zero-initialised out-projections, so every layer matters.
    Parameters outside such layers (Wan's and Krea's modulation tables, NextDiT's pad tokens, Krea's
    norm scales, which add to 1) are drawn from U(±1/√width) too. Drawn straight into the final
    storage: ~4× faster than ``reset_parameters`` on CPU."""
    generator = torch.Generator(device=next(unet.parameters()).device).manual_seed(seed)
    done = set()
    with torch.no_grad():
        for module in unet.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv1d, nn.Conv3d)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                for param in (module.weight, module.bias):
                    if param is not None:
                        param.uniform_(-bound, bound, generator=generator)
                        done.add(param)
            elif isinstance(module, (nn.GroupNorm, nn.LayerNorm)) and module.weight is not None:
                module.weight.fill_(1.0)
                module.bias.zero_()
                done.update((module.weight, module.bias))
            elif isinstance(module, RMSNorm):  # Flux's q/k norms
                module.scale.fill_(1.0)
                done.add(module.scale)
            elif isinstance(module, (MMDiTRMSNorm, nn.RMSNorm)) and module.weight is not None:  # SD3.5's q/k norms; torch's
                module.weight.fill_(1.0)
                done.add(module.weight)
        for param in unet.parameters():
            if param not in done:
                bound = 1.0 / math.sqrt(param.shape[-1])
                param.uniform_(-bound, bound, generator=generator)


def materialized(model: nn.Module, device: torch.device | str, dtype: torch.dtype, seed: int) -> nn.Module:
    """A model built on the meta device, on ``device`` with random weights, in ``dtype``, in eval mode."""
    model.to_empty(device=device)
    init_weights(model, seed)
    return model.to(dtype).eval()


def count_params(unet: nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters())


# --- measurement -------------------------------------------------------------------------------


def cpu_step_peak(fn: Callable[[], Any]) -> int:
    return cpu_step_peak_and_op(fn)[0]


def cpu_step_peak_and_op(fn: Callable[[], Any]) -> tuple[int, str]:
    """Peak bytes of CPU tensor memory allocated above what was live when ``fn`` started.

    ``torch.profiler`` with ``profile_memory=True`` records every allocation and free made by
    PyTorch's CPU allocator (which does not cache: allocated = live tensor bytes) as a
    ``[memory]`` event with a signed byte count; the running sum in time order is the live
    memory allocated during the call, and its maximum the peak. Frees of blocks allocated
    before the call are not reported, so the result is an upper bound if ``fn`` frees them.
    Also returns the innermost op running when the peak was reached.
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
        del result
    events = prof.profiler.kineto_results.events()
    memory = sorted(
        (event.start_ns(), event.nbytes()) for event in events if event.name() == "[memory]" and str(event.device_type()).endswith("CPU")
    )
    running = peak = 0
    peak_ns = None
    for start_ns, nbytes in memory:
        running += nbytes
        if running > peak:
            peak, peak_ns = running, start_ns
    enclosing = [
        (event.duration_ns(), event.name())
        for event in events
        if peak_ns is not None and event.name() != "[memory]" and event.start_ns() <= peak_ns <= event.end_ns()
    ]
    return peak, min(enclosing)[1] if enclosing else ""


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float]:
    """A distribution-free ~95 % confidence interval of the median, from order statistics."""
    ordered = sorted(values)
    n = len(ordered)
    if n < 6:
        return ordered[0], ordered[-1]
    half = z * math.sqrt(n) / 2
    low = max(0, math.floor(n / 2 - half))
    high = min(n - 1, math.ceil(n / 2 + half) - 1)
    return ordered[low], ordered[high]


def spread(values: list[float]) -> float:
    """Interquartile range over the median."""
    if len(values) < 4:
        return (max(values) - min(values)) / statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / statistics.median(values)


QUIET = 0.15  # a round is quiet when each of its steps is within 15 % of its variant's fastest step


def timing_stats(times: dict[str, list[float]], base: str = "a") -> dict[str, Any]:
    """Ratios to ``base`` ((a)) from ABBA rounds: per round, (the variant's two steps) / ((a)'s two steps).

    For each variant only the rounds where its steps and (a)'s are quiet count, when there are
    any: this machine's speed drops several-fold for tens of seconds at a time (other tenants),
    and a round caught by such a burst compares steps run at different speeds. The criterion
    is relative to each variant's own fastest step, so it cannot hide a variant being slow.
    """
    rounds = len(times[base]) // 2

    def quiet(key: str, i: int) -> bool:
        return all(times[key][j] <= (1 + QUIET) * min(times[key]) for j in (2 * i, 2 * i + 1))

    used, paired = {}, {}
    for key, values in times.items():
        used[key] = [i for i in range(rounds) if quiet(key, i) and quiet(base, i)] or list(range(rounds))
        paired[key] = [(values[2 * i] + values[2 * i + 1]) / (times[base][2 * i] + times[base][2 * i + 1]) for i in used[key]]
    a_rounds = [i for i in range(rounds) if quiet(base, i)] or list(range(rounds))
    return {
        "rounds": rounds,
        "used": used,
        "ratio": {key: statistics.median(values) for key, values in paired.items()},
        "ratio_ci": {key: median_ci(values) for key, values in paired.items()},
        "medians": {key: statistics.median(values) for key, values in times.items()},
        "a_spread_used": spread([times[base][j] for i in a_rounds for j in (2 * i, 2 * i + 1)]),
    }


def sdpa_cpu_flops(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def flop_counter() -> FlopCounterMode:
    """FlopCounterMode counts mm/addmm/bmm/baddbmm/convolution and the CUDA SDPA kernels; the CPU
    flash-attention kernel is added here with the same formula."""
    mapping = {}
    cpu_sdpa = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if cpu_sdpa is not None:
        mapping[cpu_sdpa] = sdpa_cpu_flops
    return FlopCounterMode(display=False, custom_mapping=mapping)


def counted_flops(run: Callable[[str], torch.Tensor], keys: list[str], keep_outputs: bool) -> tuple[dict[str, int], dict[str, Any]]:
    """FLOPs counted in one ``run(key)`` per key, and (``keep_outputs``) its outputs."""
    counted, outputs = {}, {}
    for key in keys:
        with flop_counter() as counter:
            out = run(key)
        if keep_outputs:
            outputs[key] = out
        del out
        counted[key] = counter.get_total_flops()
    return counted, outputs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def elapsed(step: Callable[[], Any], device: torch.device) -> float:
    """Seconds one ``step()`` takes, the device synchronised around it."""
    synchronize(device)
    start = time.perf_counter()
    out = step()
    synchronize(device)
    seconds = time.perf_counter() - start
    del out
    return seconds


def time_interleaved(timed: Callable[[str], float], keys: list[str], repeats: int, warmup: int = 0) -> dict[str, list[float]]:
    """``repeats`` timed steps per variant (rounded up to even), after ``warmup`` untimed passes.

    Interleaved in ABBA rounds: the variants in one order, then in reverse (the start
    rotated every round), so each variant's two steps in a round are centred on the same
    moment and a linear drift of the machine's speed cancels in per-round ratios.
    """
    for _ in range(warmup):
        for key in keys:
            timed(key)
    times: dict[str, list[float]] = {key: [] for key in keys}
    for round_ in range(math.ceil(repeats / 2)):
        shift = round_ % len(keys)
        order = keys[shift:] + keys[:shift]
        for key in order + order[::-1]:
            times[key].append(timed(key))
    return times


def padded_to_longest(*contexts: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Contexts of different token counts padded with their last token to the longest, so that one
    call can take them all (an extra pass's batch; only for unusual token counts)."""
    longest = max(c.shape[-2] for c in contexts)  # the token axis: [B, L, C], or Krea's [B, 1, L, C]
    return tuple(F.pad(c, (0, 0, 0, longest - c.shape[-2]), mode="replicate") for c in contexts)
