"""What NAG costs per UNet step: full-size SD1.5 and SDXL UNets with random weights.

Run from the repository root: ``python tests/bench.py --help``. The UNets are the real
``ldm.modules.diffusionmodules.openaimodel.UNetModel`` built with the full SD1.5 and SDXL
architectures (no checkpoint is loaded; the weights are random). Variants, for B images:

- (a) NAG off: one UNet call over 2B rows (cond, uncond), the CFG batch.
- (b) NAG as this project does it: the same call, every attn2 hooked by
  ``lib_nag.attention.CrossAttentionNag`` (``to_q`` hook, out-projection pre-hook, and an attn2
  pre-hook announcing the cond rows, as the A1111 host does), a warm ``NegativeKV`` cache.
- (c) NAG done naively: each attn2 runs its stock forward on all rows and again on the cond
  rows with the NAG-negative context, and ``nag_combine`` mixes the post-out-projection outputs.
- (d) an extra UNet pass for the NAG negative: one call over 3B rows (cond, uncond, negative).
- (e) NAG at CFG 1, uncond skipped: one B-row call with NAG as in (b).

``--models flux`` builds the stand-in of Forge's Flux.1 transformer (tests/forge/backend/nn/flux.py)
with Flux.1's widths (3072 = 24 heads of 128, T5 4096, pooled 768, 16-channel latents in 2×2
patches) at a reduced depth with Flux's 1:2 double:single ratio, 1024²-shaped tokens (4096 image +
512 text), at CFG 1 (Flux's usual case: one cond row per image):

- (f) NAG off: the model's own forward over B rows.
- (g) NAG as this project does it: ``lib_nag.models.flux.nag_forward`` on the same call, with
  a NAG negative of 512 tokens (as long as the prompt).
- (h) an extra full pass: the model's forward over 2B rows (cond, NAG negative), what CFG costs.

``--models sd35`` builds the stand-in of Forge's MMDiT-X (tests/forge/backend/nn/mmditx.py) with SD3.5
Large's widths (2432 = 38 heads of 64, rms qk-norm, T5+CLIP context 4096, pooled 2048, 16-channel
latents in 2×2 patches) at a reduced number of joint blocks (the last one ``pre_only``), 1024²-shaped
tokens (4096 image + 333 text: Forge's 77 CLIP + 256 T5), at CFG 1 (SD3.5 Large Turbo's case):

- (i) NAG off: the model's own forward over B rows.
- (j) NAG as this project does it: ``lib_nag.models.mmdit.nag_forward`` with Forge's rows
  (``forge_rows``), a NAG negative of 333 tokens.
- (k) an extra full pass: the model's forward over 2B rows (cond, NAG negative).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests" / "forge", ROOT / "tests" / "a1111"):  # the repository, the stand-ins of Forge's and A1111's code
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from backend.nn.flux import IntegratedFluxTransformer2DModel, RMSNorm  # noqa: E402
from backend.nn.mmditx import MMDiTX  # noqa: E402
from ldm.modules.attention import CrossAttention, SpatialTransformer  # noqa: E402
from ldm.modules.diffusionmodules.openaimodel import UNetModel  # noqa: E402
from ldm.modules.diffusionmodules.util import linear  # noqa: E402
from modules.models.sd3.mmdit import RMSNorm as MMDiTRMSNorm  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count  # noqa: E402

from lib_nag.attention import CrossAttentionNag, NegativeKV, PositiveRows, attention  # noqa: E402
from lib_nag.guidance import nag_combine  # noqa: E402
from lib_nag.models.flux import nag_forward as flux_nag_forward  # noqa: E402
from lib_nag.models.mmdit import nag_forward as mmdit_nag_forward  # noqa: E402
from lib_nag.params import NagParams  # noqa: E402
from lib_nag.webui.forge_patcher import forge_rows  # noqa: E402

MIB = 2**20
NAG_PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
VARIANTS = {
    "a": "(a) NAG off, CFG batch",
    "b": "(b) NAG on (this project)",
    "c": "(c) NAG naive (2nd attn2 call)",
    "d": "(d) extra UNet pass (3B rows)",
    "e": "(e) NAG on, CFG 1, uncond skipped",
}
TARGETS = {"overhead": 0.03, "floor_factor": 1.5, "cfg1_ratio": 0.55, "memory": 0.02}
# Elementwise work of the NAG branch, FLOPs per element (see analytic_floor).
NAG_FLOPS_PER_Z = 10  # guided (3), two L1 norms (abs + sum, 4), blend (3)
SOFTMAX_FLOPS_PER_SCORE = 5  # max, subtract, exp, sum, divide


# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UNetSpec:
    """A UNet architecture; ``transformer_depth`` is per level, as in sgm's UNet."""

    name: str
    model_channels: int
    channel_mult: tuple[int, ...]
    attention_resolutions: tuple[int, ...]
    num_res_blocks: int
    transformer_depth: tuple[int, ...]
    transformer_depth_middle: int
    context_dim: int
    num_heads: int = -1
    num_head_channels: int = -1
    use_linear: bool = False
    adm_channels: int = 0  # SDXL's ``vector`` input, through sgm's ``sequential`` label embedding
    prompt_tokens: int = 77
    negative_tokens: int = 77
    expected_attn2: int = 0  # 0: not checked
    expected_params: int = 0

    @property
    def max_depth(self) -> int:
        return max(self.transformer_depth_middle, *self.transformer_depth)


SD15 = UNetSpec("SD1.5", 320, (1, 2, 4, 4), (4, 2, 1), 2, (1, 1, 1, 1), 1, 768, num_heads=8, expected_attn2=16, expected_params=859_520_964)
SDXL = UNetSpec(
    "SDXL",
    320,
    (1, 2, 4),
    (4, 2),
    2,
    (0, 2, 10),
    10,
    2048,
    num_head_channels=64,
    use_linear=True,
    adm_channels=2816,
    expected_attn2=70,
    expected_params=2_567_463_684,
)
# Miniatures with the same code paths (per-level depths, list context, label embedding), for tests.
TINY_SD1 = UNetSpec("tiny SD1", 32, (1, 2), (1, 2), 1, (1, 1), 1, 768, num_head_channels=8, expected_attn2=7)
TINY_SDXL = UNetSpec(
    "tiny SDXL", 32, (1, 2, 2), (2, 4), 1, (0, 2, 3), 3, 2048, num_head_channels=8, use_linear=True, adm_channels=2816, expected_attn2=18
)


def spatial_transformers(unet: UNetModel, spec: UNetSpec) -> Iterator[tuple[SpatialTransformer, int]]:
    """Every SpatialTransformer with the depth its level has in ``spec``."""
    per_level = spec.num_res_blocks + 1  # res blocks, then a down-/up-sampler (none at the last level on the way down)
    levels = len(spec.channel_mult)
    blocks = [(block, spec.transformer_depth[(i - 1) // per_level]) for i, block in enumerate(unet.input_blocks) if i]
    blocks.append((unet.middle_block, spec.transformer_depth_middle))
    blocks += [(block, spec.transformer_depth[levels - 1 - j // per_level]) for j, block in enumerate(unet.output_blocks)]
    for block, depth in blocks:
        for layer in block:
            if isinstance(layer, SpatialTransformer):
                yield layer, depth


def init_weights(unet: nn.Module, seed: int) -> None:
    """PyTorch's default init in distribution (U(±1/√fan_in) for conv/linear weight and bias;
    norms 1 and 0), also for ldm's zero-initialised out-projections, so every layer matters.
    Drawn straight into the final storage: ~4× faster than ``reset_parameters`` on CPU."""
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
            elif isinstance(module, MMDiTRMSNorm):  # SD3.5's q/k norms
                module.weight.fill_(1.0)
                done.add(module.weight)
    missing = [name for name, param in unet.named_parameters() if param not in done]
    if missing:
        raise RuntimeError(f"parameters left uninitialised: {missing[:5]}")


def build_unet(spec: UNetSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> UNetModel:
    """The real ldm UNetModel with ``spec``'s architecture and random weights, in ``dtype``."""
    unet = meta_unet(spec)
    unet.to_empty(device=device)
    init_weights(unet, seed)
    unet.to(dtype)
    for module in unet.modules():
        if isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
            module.float()  # norms stay fp32, as ldm's convert_to_fp16 leaves them (CPU group_norm takes no mixed dtypes)
    unet.dtype = dtype  # ldm's forward casts x to this
    return unet.eval()


def meta_unet(spec: UNetSpec) -> UNetModel:
    """``spec``'s UNet on the meta device (no memory, no init; shapes and counts only).

    ldm's UNetModel takes one ``transformer_depth`` for every level, so it is built at the
    largest depth (``context_dim`` as a list, which ldm's SpatialTransformer indexes per block)
    and each level's transformers are cut back to that level's depth.
    """
    depth = spec.max_depth
    with torch.device("meta"):
        unet = UNetModel(
            image_size=32,
            in_channels=4,
            model_channels=spec.model_channels,
            out_channels=4,
            num_res_blocks=spec.num_res_blocks,
            attention_resolutions=list(spec.attention_resolutions),
            channel_mult=list(spec.channel_mult),
            num_heads=spec.num_heads,
            num_head_channels=spec.num_head_channels,
            use_spatial_transformer=True,
            use_linear_in_transformer=spec.use_linear,
            transformer_depth=depth,
            context_dim=[spec.context_dim] * depth,
            legacy=False,
        )
        if spec.adm_channels:
            # sgm's SDXL label embedding; ldm's forward adds label_emb(y) to the time embedding as sgm's does.
            embed = spec.model_channels * 4
            unet.num_classes = "sequential"
            unet.label_emb = nn.Sequential(nn.Sequential(linear(spec.adm_channels, embed), nn.SiLU(), linear(embed, embed)))
    for transformer, level_depth in spatial_transformers(unet, spec):
        del transformer.transformer_blocks[level_depth:]
    return unet


def attn2_modules(unet: nn.Module) -> list[nn.Module]:
    return [module for name, module in unet.named_modules() if name.endswith(".attn2")]


def count_params(unet: nn.Module) -> int:
    return sum(p.numel() for p in unet.parameters())


# --- host attention ----------------------------------------------------------------------------


def _sdp_core(self: CrossAttention, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
    context = x if context is None else context
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    return attention(q, k, v, self.heads).to(q.dtype)


def sdp_forward(
    self: CrossAttention, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **kwargs: Any
) -> torch.Tensor:
    """Behaves like A1111's xformers, Doggettx and InvokeAI forwards: attention, then ``self.to_out``."""
    return self.to_out(_sdp_core(self, x, context))


def a1111_sdp_forward(
    self: CrossAttention, x: torch.Tensor, context: torch.Tensor | None = None, mask: Any = None, **kwargs: Any
) -> torch.Tensor:
    """Behaves like A1111 1.10's scaled_dot_product_attention_forward (hypernetworks aside): SDPA,
    then ``self.to_out[0]`` and ``self.to_out[1]`` called one by one, not ``self.to_out``."""
    return self.to_out[1](self.to_out[0](_sdp_core(self, x, context)))


HOST_ATTENTION = {"a1111-sdp": a1111_sdp_forward, "sdp": sdp_forward, "ldm": CrossAttention.forward}
HOST_ATTENTION_TEXT = {
    "a1111-sdp": "SDPA shaped like A1111 1.10's scaled_dot_product_attention_forward: it calls to_out[0], then to_out[1]",
    "sdp": "SDPA ending in self.to_out(out), as A1111's xformers/Doggettx/InvokeAI forwards do",
    "ldm": "ldm's stock einsum CrossAttention.forward",
}


@contextlib.contextmanager
def host_attention(name: str) -> Iterator[None]:
    """Set the class-level attention forward, as A1111's cross-attention optimisations do."""
    original = CrossAttention.forward
    CrossAttention.forward = HOST_ATTENTION[name]
    try:
        yield
    finally:
        CrossAttention.forward = original


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
    longest = max(c.shape[1] for c in contexts)
    return tuple(F.pad(c, (0, 0, 0, longest - c.shape[1]), mode="replicate") for c in contexts)


# --- the benchmark -----------------------------------------------------------------------------


@dataclass
class Variant:
    key: str
    x: torch.Tensor
    timesteps: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None
    wrap: Callable[[nn.Module], Callable[..., torch.Tensor]] | None = None
    uses_cache: bool = False  # NAG as this project does it, with its K⁻/V⁻ cache

    @property
    def rows(self) -> int:
        return self.x.shape[0]

    def input_bytes(self) -> int:
        return sum(t.nbytes for t in (self.x, self.timesteps, self.context, self.y) if t is not None)


class ModelBench:
    """One UNet, its inputs and the five variants."""

    def __init__(
        self,
        spec: UNetSpec,
        resolution: int,
        batch: int = 1,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        attention: str = "a1111-sdp",
        seed: int = 0,
        unet: UNetModel | None = None,
    ) -> None:
        if resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8, got {resolution}")
        self.spec, self.resolution, self.batch, self.dtype, self.attention = spec, resolution, batch, dtype, attention
        self.device = torch.device(device)
        self.unet = unet if unet is not None else build_unet(spec, self.device, dtype, seed)
        self.attn2 = attn2_modules(self.unet)
        self.weight_bytes = sum(t.nbytes for t in (*self.unet.parameters(), *self.unet.buffers()))
        self.negative_kv = NegativeKV()
        self.variants = self._variants(seed)

    # inputs and variants
    def _variants(self, seed: int) -> dict[str, Variant]:
        spec, b = self.spec, self.batch
        generator = torch.Generator().manual_seed(seed + 1)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(self.device, self.dtype)

        latent = self.resolution // 8
        latents = randn(b, 4, latent, latent)
        timesteps = torch.full((b,), 500, device=self.device)
        cond, uncond = randn(b, spec.prompt_tokens, spec.context_dim), randn(b, spec.prompt_tokens, spec.context_dim)
        self.negative = randn(b, spec.negative_tokens, spec.context_dim)  # the NAG-negative context, one row per image
        if spec.adm_channels:
            y_cond, y_uncond, y_negative = (randn(b, spec.adm_channels) for _ in range(3))
        else:
            y_cond = y_uncond = y_negative = None

        def cat(*parts: torch.Tensor | None) -> torch.Tensor | None:
            return None if parts[0] is None else torch.cat(parts)

        self.positive = PositiveRows.of(list(range(b)), list(range(b)), self.device)  # cond rows come first
        x2, t2, c2, y2 = cat(latents, latents), cat(timesteps, timesteps), cat(cond, uncond), cat(y_cond, y_uncond)
        c3 = cat(*padded_to_longest(cond, uncond, self.negative))  # (d) needs one context length
        return {
            "a": Variant("a", x2, t2, c2, y2),
            "b": Variant("b", x2, t2, c2, y2, uses_cache=True),
            "c": Variant("c", x2, t2, c2, y2, wrap=self._naive_forward),
            "d": Variant("d", cat(latents, latents, latents), cat(timesteps, timesteps, timesteps), c3, cat(y_cond, y_uncond, y_negative)),
            "e": Variant("e", latents, timesteps, cond, y_cond, uses_cache=True),
        }

    @contextlib.contextmanager
    def nag_hooks(self) -> Iterator[None]:
        nag = CrossAttentionNag(NAG_PARAMS, self.negative_kv)
        nag.negative = self.negative
        nag.install(self.attn2)

        def begin(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            nag.begin_call(args[0] if args else kwargs["x"], self.positive)

        handles = [module.register_forward_pre_hook(begin, with_kwargs=True) for module in self.attn2]
        try:
            yield
        finally:
            nag.remove()
            for handle in handles:
                handle.remove()

    def _naive_forward(self, module: nn.Module) -> Callable[..., torch.Tensor]:
        positive, negative = self.positive, self.negative

        def forward(x: torch.Tensor, context: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
            stock = type(module).forward
            out = stock(module, x, context=context, **kwargs)
            rows = positive.rows
            out_negative = stock(module, x.index_select(0, rows), context=negative[positive.negative_index], **kwargs)
            guided = nag_combine(out.index_select(0, rows), out_negative, NAG_PARAMS.scale, NAG_PARAMS.tau, NAG_PARAMS.alpha)
            return out.index_copy(0, rows, guided)

        return forward

    # running
    @contextlib.contextmanager
    def installed(self, variant: Variant) -> Iterator[None]:
        if variant.wrap is not None:
            for module in self.attn2:
                module.forward = variant.wrap(module)
        try:
            with host_attention(self.attention), self.nag_hooks() if variant.uses_cache else contextlib.nullcontext():
                yield
        finally:
            if variant.wrap is not None:
                for module in self.attn2:
                    del module.forward

    def _call(self, variant: Variant) -> torch.Tensor:
        context = [variant.context] * self.spec.max_depth if self.spec.max_depth > 1 else variant.context
        kwargs = {} if variant.y is None else {"y": variant.y}
        autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype != torch.float32 else contextlib.nullcontext()
        with torch.no_grad(), autocast:
            return self.unet(variant.x, variant.timesteps, context=context, **kwargs)

    def run(self, key: str) -> torch.Tensor:
        variant = self.variants[key]
        with self.installed(variant):
            return self._call(variant)

    def timed(self, key: str) -> float:
        variant = self.variants[key]
        with self.installed(variant):
            return elapsed(lambda: self._call(variant), self.device)

    # measurements
    def outputs(self) -> dict[str, torch.Tensor]:
        """One step of every variant (this also fills the NegativeKV cache)."""
        return {key: self.run(key) for key in self.variants}

    def checks(self, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        b = self.batch
        a = outputs["a"].float()

        def relative(x: torch.Tensor, y: torch.Tensor) -> float:
            return ((x.float() - y.float()).abs().max() / y.float().abs().max().clamp_min(1e-30)).item()

        return {
            "b_uncond_bit_identical_to_a": torch.equal(outputs["b"][b:], outputs["a"][b:]),
            "c_uncond_bit_identical_to_a": torch.equal(outputs["c"][b:], outputs["a"][b:]),
            "b_cond_changed_by_nag": relative(outputs["b"][:b], a[:b]),
            "e_vs_b_cond": relative(outputs["e"], outputs["b"][:b]),
            "d_vs_a": relative(outputs["d"][: 2 * b], a),
            "c_vs_b_cond": relative(outputs["c"][:b], outputs["b"][:b]),
            "finite": all(bool(torch.isfinite(out).all()) for out in outputs.values()),
        }

    def cache_bytes(self) -> int:
        """Bytes of the warm NegativeKV cache (persistent while NAG is on)."""
        like = torch.empty(0, device=self.device, dtype=self.dtype)
        with torch.no_grad():
            return sum(t.nbytes for module in self.attn2 for t in self.negative_kv.get(module, self.negative, like))

    def memory(self) -> dict[str, dict[str, Any]]:
        """Per variant: its inputs, its persistent NAG state (the K⁻/V⁻ cache) and the step's
        peak above what was live at its start; their sum is the peak above the weights."""
        cache = self.cache_bytes()
        result = {}
        for key, variant in self.variants.items():
            gc.collect()
            with self.installed(variant):
                if self.device.type == "cuda":
                    synchronize(self.device)
                    torch.cuda.reset_peak_memory_stats(self.device)
                    base = torch.cuda.memory_allocated(self.device)
                    out = self._call(variant)
                    synchronize(self.device)
                    step = torch.cuda.max_memory_allocated(self.device) - base
                    del out
                    peak_op = ""
                else:
                    step, peak_op = cpu_step_peak_and_op(lambda variant=variant: self._call(variant))
            resident = variant.input_bytes() + (cache if variant.uses_cache else 0)
            result[key] = {"step_peak": step, "resident": resident, "above_weights": step + resident, "peak_op": peak_op}
        return result

    def flops(self, keep_outputs: bool = False) -> dict[str, Any]:
        """Counted FLOPs of one step of every variant, the query-token count each attn2 sees, and
        (``keep_outputs``) the outputs. The K⁻/V⁻ cache is filled first, as in a sampling pass
        after its first step, so its projections are not counted."""
        self.cache_bytes()
        tokens: dict[nn.Module, int] = {}

        def record(module: nn.Module, args: tuple) -> None:
            tokens.setdefault(module, args[0].shape[1])

        hooks = [module.register_forward_pre_hook(record) for module in self.attn2]
        try:
            counted, outputs = counted_flops(self.run, list(self.variants), keep_outputs)
        finally:
            for hook in hooks:
                hook.remove()
        return {"counted": counted, "attn2": [(tokens[m], m.to_q.out_features, m.heads) for m in self.attn2], "outputs": outputs}

    def analytic_floor(self, attn2_shapes: list[tuple[int, int, int]], unet_flops: int) -> dict[str, float]:
        """Extra FLOPs NAG needs per step over (a): per attn2, one attention core (QKᵀ and AV) of the
        positive rows against the NAG-negative tokens, plus the elementwise NAG work. K⁻/V⁻ are
        cached, so their projection costs nothing per step."""
        positive, negative_tokens = self.batch, self.spec.negative_tokens
        core = elementwise = 0
        for tokens, inner, heads in attn2_shapes:
            core += 2 * 2 * positive * tokens * negative_tokens * inner  # QKᵀ and AV, 2 FLOPs per multiply-add
            elementwise += (
                NAG_FLOPS_PER_Z * positive * tokens * inner + SOFTMAX_FLOPS_PER_SCORE * positive * heads * tokens * negative_tokens
            )
        return {
            "core_flops": core,
            "elementwise_flops": elementwise,
            "unet_flops_a": unet_flops,
            "fraction": (core + elementwise) / unet_flops,
            "core_fraction": core / unet_flops,
        }


def profile_nag(bench: ModelBench, top: int = 14) -> dict[str, Any]:
    """Where (b)'s extra time goes, without subtracting two noisy step totals.

    One (b) step is profiled with ``lib_nag.attention.guide_rows`` (the negative branch and
    the NAG combine, called from the ``to_out`` pre-hook) wrapped in a profiler range; the ops
    inside it are NAG's own. Op counts of one (a) step give the ops NAG adds elsewhere (the
    ``to_q`` hook's ``index_select``). Hook registration and Python overhead are not ops.
    """
    from lib_nag import attention as nag_module

    original = nag_module.guide_rows
    label = "NAG guide_rows"

    def traced(*args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.profiler.record_function(label):
            return original(*args, **kwargs)

    counts, inside, spans = {}, {}, []
    nag_module.guide_rows = traced
    try:
        for key in ("a", "b"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                started = time.perf_counter()
                out = bench.run(key)
                synchronize(bench.device)
                step_ms = (time.perf_counter() - started) * 1e3
            del out
            events = prof.events()
            counts[key] = {}
            for event in events:
                if event.name.startswith("aten::"):
                    counts[key][event.name] = counts[key].get(event.name, 0) + 1
            if key == "b":
                b_step_ms = step_ms
                for event in events:
                    if event.name == label:
                        spans.append(event.cpu_time_total / 1e3)
                        continue
                    parent = event.cpu_parent
                    while parent is not None and parent.name != label:
                        parent = parent.cpu_parent
                    if parent is not None:
                        time_ms, calls = inside.get(event.name, (0.0, 0))
                        inside[event.name] = (time_ms + event.self_cpu_time_total / 1e3, calls + 1)
    finally:
        nag_module.guide_rows = original
    added = {name: counts["b"].get(name, 0) - counts["a"].get(name, 0) for name in set(counts["a"]) | set(counts["b"])}
    rows = sorted(
        ({"op": name, "self_ms": time_ms, "calls": calls} for name, (time_ms, calls) in inside.items()), key=lambda row: -row["self_ms"]
    )
    return {
        "b_step_ms": b_step_ms,
        "guide_rows_ms": sum(spans),
        "guide_rows_calls": len(spans),
        "inside_guide_rows": rows[:top],
        "aten_ops_added": sum(added.values()),
        "aten_ops_added_by_name": {name: n for name, n in sorted(added.items(), key=lambda item: -item[1]) if n},
    }


# --- Flux and SD3.5: transformers at CFG 1 -------------------------------------------------------

FLUX_VARIANTS = {
    "f": "(f) NAG off, the model's own forward",
    "g": "(g) NAG on (this project)",
    "h": "(h) extra full pass (2B rows, as CFG)",
}
SD35_VARIANTS = {
    "i": "(i) NAG off, the model's own forward",
    "j": "(j) NAG on (this project)",
    "k": "(k) extra full pass (2B rows, as CFG)",
}
DIT_TARGETS = {"floor_factor": 1.2, "extra_pass_fraction": 0.75}
SIGMA, FLUX_GUIDANCE = 0.5, 3.5  # a mid-schedule sigma; Flux.1-dev's usual distilled guidance
HEAD_DIM = 128  # Flux.1's: 3072 wide, 24 heads; a reduced width keeps it (and the rotary axes 16 + 56 + 56)
SD35_HEAD_DIM = 64  # MMDiT's "magic": hidden 64·depth, depth heads of 64


class PatchTokens:
    """What Flux's and SD3's specs share: 16-channel latents in 2×2 patches, an MLP of ``mlp_ratio``."""

    hidden_size: int
    mlp_ratio: float

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @staticmethod
    def image_tokens(resolution: int) -> int:
        return ((resolution // 8 + 1) // 2) ** 2


@dataclass(frozen=True)
class FluxSpec(PatchTokens):
    """Widths and depths of Forge's ``IntegratedFluxTransformer2DModel`` (Flux.1: 19 double + 38 single
    blocks, 3072 wide, T5-XXL text of 4096, CLIP-L pooled 768, 16-channel latents in 2×2 patches)."""

    name: str
    hidden_size: int
    num_heads: int
    double_blocks: int
    single_blocks: int
    axes_dim: tuple[int, ...]
    context_dim: int = 4096
    pooled_dim: int = 768
    latent_channels: int = 16
    mlp_ratio: float = 4.0
    prompt_tokens: int = 512
    negative_tokens: int = 512


@dataclass(frozen=True)
class SD35Spec(PatchTokens):
    """Widths and depth of Forge's ``MMDiTX`` as SD3.5 Large (and Large Turbo) has them: 38 joint blocks,
    hidden 64·38 = 2432 (38 heads of 64), rms qk-norm, T5+CLIP context of 4096, pooled CLIP-L+G 2048,
    16-channel latents in 2×2 patches. Forge's context: 77 CLIP tokens + 256 T5 tokens (zeros with T5 off)."""

    name: str
    hidden_size: int
    joint_blocks: int
    context_dim: int = 4096
    pooled_dim: int = 2048
    latent_channels: int = 16
    mlp_ratio: float = 4.0
    prompt_tokens: int = 333
    negative_tokens: int = 333

    @property
    def num_heads(self) -> int:
        return self.hidden_size // SD35_HEAD_DIM


FLUX = FluxSpec("Flux.1", 3072, 24, 19, 38, (16, 56, 56))
TINY_FLUX = FluxSpec("tiny Flux", 64, 4, 1, 2, (4, 6, 6), 32, pooled_dim=12, latent_channels=4, prompt_tokens=7, negative_tokens=5)
SD35 = SD35Spec("SD3.5 Large", 2432, 38)
TINY_SD35 = SD35Spec("tiny SD3.5", 192, 2, context_dim=24, pooled_dim=12, prompt_tokens=7, negative_tokens=5)
MODELS: dict[str, UNetSpec | FluxSpec | SD35Spec] = {
    "sd15": SD15,
    "sdxl": SDXL,
    "flux": FLUX,
    "sd35": SD35,
    "tiny-sd1": TINY_SD1,
    "tiny-sdxl": TINY_SDXL,
    "tiny-flux": TINY_FLUX,
    "tiny-sd35": TINY_SD35,
}


def materialized(model: nn.Module, device: torch.device | str, dtype: torch.dtype, seed: int) -> nn.Module:
    """A model built on the meta device, on ``device`` with random weights, in ``dtype``, in eval mode."""
    model.to_empty(device=device)
    init_weights(model, seed)
    return model.to(dtype).eval()


def build_flux(spec: FluxSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The Forge Flux stand-in (tests/forge/backend/nn/flux.py) with ``spec``'s sizes and random weights."""
    with torch.device("meta"):
        model = IntegratedFluxTransformer2DModel(
            spec.latent_channels, spec.pooled_dim, spec.context_dim, spec.hidden_size, spec.mlp_ratio, spec.num_heads,
            spec.double_blocks, spec.single_blocks, list(spec.axes_dim), 10000, qkv_bias=True, guidance_embed=True,
        )  # fmt: skip
    return materialized(model, device, dtype, seed)


def build_sd35(
    spec: SD35Spec, resolution: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0
) -> nn.Module:
    """The Forge MMDiT-X stand-in (tests/forge/backend/nn/mmditx.py) with ``spec``'s sizes and random weights.

    MMDiT-X takes its width from its depth (64·depth), so it is built at the depth of ``spec``'s width
    and cut back to ``spec.joint_blocks``: the first ones and the last, ``pre_only``, block. The
    positional embedding covers ``resolution`` (SD3.5 Large's grid is 192², which no image here needs).
    """
    with torch.device("meta"):
        model = MMDiTX(
            depth=spec.num_heads, pos_embed_max_size=resolution // 16, qk_norm="rms", adm_in_channels=spec.pooled_dim,
            context_in=spec.context_dim,
        )  # fmt: skip
    del model.joint_blocks[spec.joint_blocks - 1 : -1]
    model = materialized(model, device, dtype, seed)
    with torch.no_grad():
        model.pos_embed.normal_(0.0, 0.1, generator=torch.Generator(device=model.pos_embed.device).manual_seed(seed))
    return model


def _stream_flops(spec: PatchTokens, tokens: int) -> int:
    """Linear layers of one stream on ``tokens``: qkv + proj + MLP (double/joint block) = linear1 + linear2 (single block)."""
    d = spec.hidden_size
    return tokens * 2 * (4 * d * d + 2 * d * spec.mlp_hidden)


def _attention_flops(spec: PatchTokens, tokens: int) -> int:
    """QKᵀ and AV of one joint attention over ``tokens``."""
    return 4 * tokens * tokens * spec.hidden_size


def _single_block_flops(spec: FluxSpec, tokens: int) -> int:
    """One row of a single-stream block over ``tokens``: its stream, modulation and attention."""
    return _stream_flops(spec, tokens) + 2 * spec.hidden_size * 3 * spec.hidden_size + _attention_flops(spec, tokens)


def _text_embedding_flops(spec: FluxSpec | SD35Spec, text_tokens: int) -> int:
    """The context embedding (txt_in / context_embedder) on the text tokens and the pooled vector's (vector_in / y_embedder)."""
    d = spec.hidden_size
    return 2 * text_tokens * spec.context_dim * d + 2 * (spec.pooled_dim * d + d * d)


def _elementwise_flops(spec: FluxSpec | SD35Spec, image_tokens: int, blocks: int, batch: int) -> int:
    """The NAG combine on the image tokens and the softmax of the second attention, in ``blocks`` blocks."""
    joint = spec.negative_tokens + image_tokens
    per_block = NAG_FLOPS_PER_Z * image_tokens * spec.hidden_size + SOFTMAX_FLOPS_PER_SCORE * spec.num_heads * joint * joint
    return batch * blocks * per_block


def _floor(parts: dict[str, int], batch: int, matmul: int, elementwise: int) -> dict[str, int]:
    """The floor's parts (per row) for ``batch`` rows, its matmul and elementwise FLOPs and their sum."""
    return {name: batch * flops for name, flops in parts.items()} | {
        "matmul_flops": matmul,
        "elementwise_flops": elementwise,
        "floor_flops": matmul + elementwise,
    }


def flux_nag_flops(spec: FluxSpec, image_tokens: int, batch: int = 1) -> dict[str, int]:
    """The analytic floor of NAG's extra FLOPs over (f) for ``batch`` positive rows (2 FLOPs per multiply-add).

    Per double block: the NAG text stream's linear layers (qkv, proj, MLP) on the negative's tokens
    and its modulation, plus the second joint attention over [negative text; image] (QKᵀ and AV;
    the image q/k/v are the positive row's). Per single block: the NAG row as a full stream, as the
    authors run it (linear1 and linear2 on [negative text; image] tokens, its modulation and its
    attention). Before the blocks: txt_in on the negative, vector_in on its pooled vector. Matmuls
    are what FlopCounterMode counts; the elementwise part is the NAG combine on the image tokens of
    every block and the softmax of the second attention.
    """
    d, text, joint = spec.hidden_size, spec.negative_tokens, spec.negative_tokens + image_tokens
    per_double = _stream_flops(spec, text) + 2 * d * 6 * d + _attention_flops(spec, joint)
    per_single = _single_block_flops(spec, joint)
    embeddings = _text_embedding_flops(spec, text)
    matmul = batch * (embeddings + spec.double_blocks * per_double + spec.single_blocks * per_single)
    elementwise = _elementwise_flops(spec, image_tokens, spec.double_blocks + spec.single_blocks, batch)
    return _floor({"per_double_block": per_double, "per_single_block": per_single, "embeddings": embeddings}, batch, matmul, elementwise)


def flux_pass_flops(spec: FluxSpec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows, analytically (what (h) adds to (f))."""
    d, patch, text = spec.hidden_size, 4 * spec.latent_channels, max(spec.prompt_tokens, spec.negative_tokens)
    joint = text + image_tokens
    per_double = _stream_flops(spec, joint) + 2 * 2 * d * 6 * d + _attention_flops(spec, joint)
    embeddings = 2 * image_tokens * patch * d + _text_embedding_flops(spec, text) + 2 * 2 * (256 * d + d * d)  # + time_in, guidance_in
    final = 2 * d * 2 * d + 2 * image_tokens * d * patch
    return batch * (embeddings + spec.double_blocks * per_double + spec.single_blocks * _single_block_flops(spec, joint) + final)


def _last_context_flops(spec: SD35Spec, tokens: int) -> int:
    """The last (``pre_only``) context block on ``tokens``: its qkv and its 2 modulations."""
    d = spec.hidden_size
    return 2 * tokens * 3 * d * d + 2 * d * 2 * d


def sd35_nag_flops(spec: SD35Spec, image_tokens: int, batch: int = 1) -> dict[str, int]:
    """The analytic floor of NAG's extra FLOPs over (i) for ``batch`` positive rows (2 FLOPs per multiply-add).

    Per joint block: the NAG context stream's linear layers on the negative's tokens (qkv, proj and
    MLP with its 6 modulations; only qkv and 2 modulations in the last, ``pre_only``, block) plus the
    second joint attention over [NAG context; image] (QKᵀ and AV; the image q/k/v are the positive
    row's). Before the blocks: context_embedder on the negative, y_embedder on its pooled vector.
    The elementwise part as for Flux: the NAG combine on the image tokens of every block and the
    softmax of the second attention.
    """
    d, text, joint = spec.hidden_size, spec.negative_tokens, spec.negative_tokens + image_tokens
    per_block = _stream_flops(spec, text) + 2 * d * 6 * d + _attention_flops(spec, joint)
    last_block = _last_context_flops(spec, text) + _attention_flops(spec, joint)
    embeddings = _text_embedding_flops(spec, text)
    matmul = batch * (embeddings + (spec.joint_blocks - 1) * per_block + last_block)
    elementwise = _elementwise_flops(spec, image_tokens, spec.joint_blocks, batch)
    return _floor({"per_joint_block": per_block, "last_joint_block": last_block, "embeddings": embeddings}, batch, matmul, elementwise)


def sd35_pass_flops(spec: SD35Spec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows, analytically (what (k) adds to (i))."""
    d, patch, text = spec.hidden_size, 4 * spec.latent_channels, max(spec.prompt_tokens, spec.negative_tokens)
    joint, image_block = text + image_tokens, _stream_flops(spec, image_tokens) + 2 * d * 6 * d
    per_block = _stream_flops(spec, text) + 2 * d * 6 * d + image_block + _attention_flops(spec, joint)
    last_block = _last_context_flops(spec, text) + image_block + _attention_flops(spec, joint)
    embeddings = 2 * image_tokens * patch * d + _text_embedding_flops(spec, text) + 2 * (256 * d + d * d)  # + t_embedder
    final = 2 * d * 2 * d + 2 * image_tokens * d * patch
    return batch * (embeddings + (spec.joint_blocks - 1) * per_block + last_block + final)


class DiTBench(ABC):
    """A transformer at CFG 1 (one cond row per image, ``cond_or_uncond`` [0]) and its three variants:
    NAG off, NAG on, an extra full pass with the NAG negative as a second prompt."""

    variants: dict[str, str]
    row_arguments: tuple[str, ...]  # the call's per-row arguments besides context and y
    full_model: Any  # the spec at full size
    nag_flops: Callable[..., dict[str, int]]  # (spec, image tokens, batch): the analytic floor of NAG's extra FLOPs
    pass_flops: Callable[..., int]  # (spec, image tokens, batch): the matmul FLOPs of one forward

    def __init__(
        self,
        spec: FluxSpec | SD35Spec,
        resolution: int,
        batch: int = 1,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        seed: int = 0,
    ) -> None:
        if resolution % 16:
            raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
        self.spec, self.resolution, self.batch, self.dtype = spec, resolution, batch, dtype
        self.device = torch.device(device)
        self.image_tokens = spec.image_tokens(resolution)
        self.model = self.build(seed)
        self.weight_bytes = sum(t.nbytes for t in self.model.parameters())
        generator = torch.Generator().manual_seed(seed + 1)

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=generator).to(self.device, self.dtype)

        b, latent = batch, resolution // 8
        sigmas = torch.full((b,), SIGMA, device=self.device, dtype=self.dtype)
        common = {
            "x": randn(b, spec.latent_channels, latent, latent),
            "context": randn(b, spec.prompt_tokens, spec.context_dim),
            "y": randn(b, spec.pooled_dim),
            "transformer_options": {"cond_or_uncond": [0], "sigmas": sigmas},
        }
        cond = common | self.call_arguments(sigmas)
        negative = {"crossattn": randn(b, spec.negative_tokens, spec.context_dim), "vector": randn(b, spec.pooled_dim)}
        off, nag, extra = self.variants
        self.calls = {
            off: (self.model, cond),
            nag: (self.nag(lambda: negative), cond),
            extra: (self.model, self._extra_pass(cond, negative)),
        }

    @abstractmethod
    def build(self, seed: int) -> nn.Module: ...

    @abstractmethod
    def call_arguments(self, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
        """The call's timestep (and guidance) arguments, as Forge passes them."""

    @abstractmethod
    def nag(self, negative: Callable[[], dict[str, torch.Tensor]]) -> Callable[..., torch.Tensor]:
        """The model's forward with NAG as this project does it."""

    def floor(self) -> dict[str, int]:
        return type(self).nag_flops(self.spec, self.image_tokens, self.batch)

    def extra_pass_flops(self) -> int:
        return type(self).pass_flops(self.spec, self.image_tokens, self.batch)

    def full_model_floor_over_extra_pass(self, negative_tokens: int) -> float:
        """The floor over the extra pass for the full-size model at 1024²."""
        full, tokens = replace(self.full_model, negative_tokens=negative_tokens), self.full_model.image_tokens(1024)
        return type(self).nag_flops(full, tokens)["floor_flops"] / type(self).pass_flops(full, tokens)

    @abstractmethod
    def describe(self) -> tuple[str, str]:
        """The blocks and width, for the heading; the full model's, for the floor's comparison."""

    @abstractmethod
    def floor_text(self, floor: dict[str, Any]) -> str:
        """What the floor counts, per block."""

    def _extra_pass(self, cond: dict[str, Any], negative: dict[str, torch.Tensor]) -> dict[str, Any]:
        """The cond rows and one row per image with the NAG negative as its prompt, in one call."""
        rows = {name: torch.cat((cond[name], cond[name])) for name in ("x", *self.row_arguments)}
        context = torch.cat(padded_to_longest(cond["context"], negative["crossattn"]))
        options = {"cond_or_uncond": [0, 1], "sigmas": cond["transformer_options"]["sigmas"]}
        return rows | {"context": context, "y": torch.cat((cond["y"], negative["vector"])), "transformer_options": options}

    def rows(self, key: str) -> int:
        return self.calls[key][1]["x"].shape[0]

    def run(self, key: str) -> torch.Tensor:
        forward, arguments = self.calls[key]
        with torch.no_grad():
            return forward(**arguments)

    def timed(self, key: str) -> float:
        return elapsed(lambda: self.run(key), self.device)

    def checks(self, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        off, nag, extra = self.variants
        base, b = outputs[off].float(), self.batch

        def relative(x: torch.Tensor, y: torch.Tensor) -> float:
            return ((x.float() - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()

        return {
            f"{nag}_changed_by_nag": relative(outputs[nag], base),
            f"{extra}_cond_rows_vs_{off}": relative(outputs[extra][:b], base),
            "finite": all(bool(torch.isfinite(out).all()) for out in outputs.values()),
        }


class FluxBench(DiTBench):
    """The Flux stand-in; (g) is ``lib_nag.models.flux.nag_forward``."""

    variants = FLUX_VARIANTS
    row_arguments = ("timestep", "guidance")
    full_model = FLUX
    nag_flops = staticmethod(flux_nag_flops)
    pass_flops = staticmethod(flux_pass_flops)
    spec: FluxSpec

    def build(self, seed: int) -> nn.Module:
        return build_flux(self.spec, self.device, self.dtype, seed)

    def call_arguments(self, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"timestep": sigmas, "guidance": torch.full_like(sigmas, FLUX_GUIDANCE)}

    def nag(self, negative: Callable[[], dict[str, torch.Tensor]]) -> Callable[..., torch.Tensor]:
        return flux_nag_forward(self.model, negative, NAG_PARAMS, lambda _options: True)

    def describe(self) -> tuple[str, str]:
        spec = self.spec
        return f"{spec.double_blocks} double + {spec.single_blocks} single blocks", "Flux.1's full model (3072 wide, 19 + 38 blocks)"

    def floor_text(self, floor: dict[str, Any]) -> str:
        return (
            f"Per double block {floor['per_double_block'] / 1e9:,.2f} GFLOP: the NAG text stream's linear layers on its "
            f"{self.spec.negative_tokens} tokens and the second joint attention [NAG text; image] (QKᵀ and AV). Per single block "
            f"{floor['per_single_block'] / 1e9:,.2f} GFLOP: the NAG rows' whole stream (linear1/linear2 on [NAG text; image] and their "
            "attention), since the authors run the NAG rows as a full stream there. Plus txt_in/vector_in on the negative "
            f"({floor['embeddings'] / 1e9:,.2f})"
        )


class SD35Bench(DiTBench):
    """Forge's MMDiT-X stand-in; (j) is ``lib_nag.models.mmdit.nag_forward`` with Forge's rows."""

    variants = SD35_VARIANTS
    row_arguments = ("t",)
    full_model = SD35
    nag_flops = staticmethod(sd35_nag_flops)
    pass_flops = staticmethod(sd35_pass_flops)
    spec: SD35Spec

    def build(self, seed: int) -> nn.Module:
        return build_sd35(self.spec, self.resolution, self.device, self.dtype, seed)

    def call_arguments(self, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"t": sigmas * 1000}  # Forge's KModel passes σ·1000 to SD3

    def nag(self, negative: Callable[[], dict[str, torch.Tensor]]) -> Callable[..., torch.Tensor]:
        return mmdit_nag_forward(self.model, negative, NAG_PARAMS, forge_rows(lambda _options: True))

    def describe(self) -> tuple[str, str]:
        return f"{self.spec.joint_blocks} joint blocks", "SD3.5 Large's full model (2432 wide, 38 joint blocks)"

    def floor_text(self, floor: dict[str, Any]) -> str:
        return (
            f"Per joint block {floor['per_joint_block'] / 1e9:,.2f} GFLOP: the NAG context stream's linear layers on its "
            f"{self.spec.negative_tokens} tokens (qkv, proj, MLP, modulation) and the second joint attention [NAG context; image] "
            f"(QKᵀ and AV); in the last, pre_only, block {floor['last_joint_block'] / 1e9:,.2f} GFLOP (qkv and attention only). "
            f"Plus context_embedder/y_embedder on the negative ({floor['embeddings'] / 1e9:,.2f})"
        )


DIT_BENCHES: dict[type, type[DiTBench]] = {FluxSpec: FluxBench, SD35Spec: SD35Bench}


def dit_spec_for(name: str, args: argparse.Namespace) -> FluxSpec | SD35Spec:
    """``flux`` and ``sd35`` at the width, depth and NAG-negative length the options give; the tiny ones as they are."""
    spec = MODELS[name]
    if spec is FLUX:
        double, single = args.flux_blocks
        return replace(
            FLUX,
            hidden_size=args.flux_hidden,
            num_heads=args.flux_hidden // HEAD_DIM,
            double_blocks=double,
            single_blocks=single,
            negative_tokens=args.flux_negative_tokens,
        )
    if spec is SD35:
        return replace(SD35, hidden_size=args.sd35_hidden, joint_blocks=args.sd35_blocks, negative_tokens=args.sd35_negative_tokens)
    return spec


def dit_targets(stats: dict[str, Any], keys: list[str], floor_fraction: float) -> dict[str, Any]:
    """NAG's measured extra cost against 1.2× the analytic floor, and against the extra pass's extra cost."""
    _, nag, extra = keys
    overhead, extra_pass = stats["ratio"][nag] - 1, stats["ratio"][extra] - 1
    floor_bound, pass_bound = DIT_TARGETS["floor_factor"] * floor_fraction, DIT_TARGETS["extra_pass_fraction"]
    of_extra_pass = overhead / extra_pass
    return {
        "floor": {
            "value": overhead,
            "limit": floor_bound,
            "pass": overhead <= floor_bound,
            "measured_over_floor": overhead / floor_fraction,
        },
        "extra_pass": {"value": of_extra_pass, "limit": pass_bound, "pass": of_extra_pass <= pass_bound},
    }


def run_dit_model(
    spec: FluxSpec | SD35Spec, resolution: int, negative_tokens: int, args: argparse.Namespace, log: Callable[[str], None] = print
) -> dict[str, Any]:
    started = time.perf_counter()
    bench = DIT_BENCHES[type(spec)](spec, resolution, args.batch, args.device, DTYPES[args.dtype], args.seed)
    build_s = time.perf_counter() - started
    repeats = args.repeats or default_repeats(spec, args)
    blocks, _ = bench.describe()
    log(
        f"\n## {spec.name} at {resolution}×{resolution} ({bench.image_tokens} image + {spec.prompt_tokens} text tokens; NAG negative "
        f"{spec.negative_tokens} tokens), {blocks}, hidden {spec.hidden_size} ({spec.num_heads} heads of "
        f"{spec.hidden_size // spec.num_heads}), CFG 1, batch {args.batch}, {args.dtype}, {repeats} timed steps per variant"
    )
    log(f"Model: {count_params(bench.model):,} parameters, weights {bench.weight_bytes / MIB:,.0f} MiB, built in {build_s:.1f} s.")

    started = time.perf_counter()
    keys = list(bench.variants)
    off, nag, extra = keys
    counted, outputs = counted_flops(bench.run, keys, keep_outputs=True)  # the first step of each: warm-up, FLOPs, outputs
    checks = bench.checks(outputs)
    del outputs
    times = time_interleaved(bench.timed, keys, repeats, args.warmup)
    measure_s = time.perf_counter() - started

    stats = timing_stats(times, base=off)
    floor: dict[str, Any] = bench.floor()
    floor["fraction"] = floor["floor_flops"] / counted[off]
    floor[f"counted_extra_{nag}"], floor[f"counted_extra_{extra}"] = counted[nag] - counted[off], counted[extra] - counted[off]
    floor["analytic_extra_pass"] = bench.extra_pass_flops()
    floor["floor_over_extra_pass"] = floor["floor_flops"] / floor[f"counted_extra_{extra}"]
    floor["full_model_floor_over_extra_pass"] = bench.full_model_floor_over_extra_pass(negative_tokens)
    targets = dit_targets(stats, keys, floor["fraction"])
    for line in dit_report(bench, times, stats, counted, floor, checks, targets):
        log(line)
    log(f"(measured in {measure_s:.0f} s)")
    return {
        "model": spec.name,
        "spec": asdict(spec),
        "resolution": resolution,
        "image_tokens": bench.image_tokens,
        "batch": args.batch,
        "dtype": args.dtype,
        "repeats": repeats,
        "parameters": count_params(bench.model),
        "weight_bytes": bench.weight_bytes,
        "build_s": build_s,
        "measure_s": measure_s,
        "variants": {
            key: {
                "label": label,
                "rows": bench.rows(key),
                "median_ms": stats["medians"][key] * 1e3,
                "min_ms": min(times[key]) * 1e3,
                f"ratio_to_{off}": stats["ratio"][key],
                f"ratio_to_{off}_ci95": list(stats["ratio_ci"][key]),
                "times_ms": [value * 1e3 for value in times[key]],
                "iqr_over_median": spread(times[key]),
                "counted_flops": counted[key],
            }
            for key, label in bench.variants.items()
        },
        "nag_extra_over_extra_pass": targets["extra_pass"]["value"],
        "floor": floor,
        "noise": {f"{off}_iqr_over_median": spread(times[off]), "rounds": stats["rounds"], "rounds_used": stats["used"]},
        "checks": checks,
        "targets": targets,
    }


def dit_report(
    bench: DiTBench,
    times: dict[str, list[float]],
    stats: dict[str, Any],
    counted: dict[str, int],
    floor: dict[str, Any],
    checks: dict[str, Any],
    targets: dict[str, Any],
) -> list[str]:
    spec, ratio, medians, verdict = bench.spec, stats["ratio"], stats["medians"], {True: "PASS", False: "MISS"}
    off, nag, extra = bench.variants
    blocks, full_model = bench.describe()
    lines = [
        "",
        f"| variant | rows | median ms/step | min ms/step | ×({off}) paired [95 % CI] | extra vs ({off}) | counted GFLOP | IQR/median |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, label in bench.variants.items():
        interval = "" if key == off else f" [{stats['ratio_ci'][key][0]:.3f}, {stats['ratio_ci'][key][1]:.3f}]"
        more = "—" if key == off else format(ratio[key] - 1, "+.1%")
        lines.append(
            f"| {label} | {bench.rows(key)} | {medians[key] * 1e3:,.1f} | {min(times[key]) * 1e3:,.1f} | {ratio[key]:.3f}{interval} | "
            f"{more} | {counted[key] / 1e9:,.1f} | {spread(times[key]):.1%} |"
        )
    return [
        *lines,
        "",
        f"Analytic floor of NAG's extra FLOPs: {floor['floor_flops'] / 1e9:,.2f} GFLOP = {floor['fraction']:.1%} of ({off})'s counted "
        f"{counted[off] / 1e9:,.1f} GFLOP. {bench.floor_text(floor)} and {floor['elementwise_flops'] / 1e9:,.2f} GFLOP elementwise "
        f"(NAG combine {NAG_FLOPS_PER_Z}/element, softmax {SOFTMAX_FLOPS_PER_SCORE}/score; norms, GELU and RoPE not counted).",
        f"Counted with FlopCounterMode (mm/addmm/bmm, SDPA): ({nag})−({off}) {floor[f'counted_extra_{nag}'] / 1e9:,.2f} GFLOP (analytic "
        f"matmuls {floor['matmul_flops'] / 1e9:,.2f}); ({extra})−({off}) {floor[f'counted_extra_{extra}'] / 1e9:,.2f} GFLOP (analytic "
        f"{floor['analytic_extra_pass'] / 1e9:,.2f}). Floor / extra pass = {floor['floor_over_extra_pass']:.3f} here, "
        f"{floor['full_model_floor_over_extra_pass']:.3f} for {full_model} at 1024²: the least ({nag}) can cost relative to ({extra}) "
        "by FLOPs, with the authors' formulation.",
        f"Checks: NAG moved ({nag})'s output by {checks[f'{nag}_changed_by_nag']:.3g} (max |Δ| / max |({off})|); ({extra})'s cond rows "
        f"vs ({off}): {checks[f'{extra}_cond_rows_vs_{off}']:.2e}; all finite: {checks['finite']}.",
        "",
        f"Targets ({spec.name}, {bench.resolution}², {blocks}, hidden {spec.hidden_size}):",
        f"- ({nag})/({off}) − 1 = {ratio[nag] - 1:+.1%} ≤ {DIT_TARGETS['floor_factor']}× floor = {targets['floor']['limit']:.1%}: "
        f"{verdict[targets['floor']['pass']]} (measured/floor {targets['floor']['measured_over_floor']:.2f})",
        f"- (({nag})−({off})) / (({extra})−({off})) = {targets['extra_pass']['value']:.3f} ≤ {DIT_TARGETS['extra_pass_fraction']}: "
        f"{verdict[targets['extra_pass']['pass']]} (by FLOPs at best {floor['floor_over_extra_pass']:.3f})",
    ]


# --- report ------------------------------------------------------------------------------------


def run_model(spec: UNetSpec, resolution: int, args: argparse.Namespace, log: Callable[[str], None] = print) -> dict[str, Any]:
    dtype = DTYPES[args.dtype]
    started = time.perf_counter()
    bench = ModelBench(spec, resolution, args.batch, args.device, dtype, args.attention, args.seed)
    build_s = time.perf_counter() - started
    params, attn2 = count_params(bench.unet), len(bench.attn2)
    latent = resolution // 8
    repeats = args.repeats or default_repeats(spec, args)
    log(
        f"\n## {spec.name} at {resolution}×{resolution} (latent {latent}×{latent}), batch {args.batch}, {args.dtype}, "
        f"host attention '{args.attention}', {repeats} timed steps per variant"
    )
    architecture_ok = (not spec.expected_attn2 or attn2 == spec.expected_attn2) and (
        not spec.expected_params or params == spec.expected_params
    )
    log(
        f"UNet: {params:,} parameters, {attn2} attn2 modules, weights {bench.weight_bytes / MIB:,.0f} MiB, built in {build_s:.1f} s; "
        f"architecture check: {'OK' if architecture_ok else 'MISMATCH'}"
        + (f" (expected {spec.expected_attn2} attn2, {spec.expected_params:,} parameters)" if spec.expected_params else "")
    )

    started = time.perf_counter()
    flops = bench.flops(keep_outputs=True)  # the first step of each variant: warm-up, FLOPs, outputs
    checks = bench.checks(flops.pop("outputs"))
    times = time_interleaved(bench.timed, list(bench.variants), repeats, args.warmup)
    memory = bench.memory()
    profile = profile_nag(bench) if args.profile else None
    cache = bench.cache_bytes()
    measure_s = time.perf_counter() - started

    stats = timing_stats(times)
    ratio, ratio_ci, medians = stats["ratio"], stats["ratio_ci"], stats["medians"]
    peak = {key: value["above_weights"] for key, value in memory.items()}
    floor = bench.analytic_floor(flops["attn2"], flops["counted"]["a"])
    counted_extra = flops["counted"]["b"] - flops["counted"]["a"]

    overhead, cfg1 = ratio["b"] - 1, ratio["e"]
    low, high = ratio_ci["b"]
    noise_half_width = max((high - low) / 2, stats["a_spread_used"])
    floor_bound = TARGETS["floor_factor"] * floor["fraction"]
    memory_overhead = peak["b"] / peak["a"] - 1
    memory_overhead_total = (bench.weight_bytes + peak["b"]) / (bench.weight_bytes + peak["a"]) - 1
    noise = {
        "a_iqr_over_median": spread(times["a"]),
        "a_iqr_over_median_used_rounds": stats["a_spread_used"],
        "a_max_over_min": max(times["a"]) / min(times["a"]),
        "b_over_a_ci95": [low - 1, high - 1],
        "noise_half_width": noise_half_width,
        "rounds": stats["rounds"],
        "rounds_used": stats["used"],
    }
    targets = {
        "overhead": {"value": overhead, "limit": TARGETS["overhead"], "pass": overhead <= TARGETS["overhead"]},
        "floor": {
            "value": overhead,
            "limit": floor_bound,
            "pass": overhead <= floor_bound,
            "measured_over_floor": overhead / floor["fraction"],
            "within_noise": abs(overhead - floor_bound) <= noise_half_width,
        },
        "cfg1_ratio": {"value": cfg1, "limit": TARGETS["cfg1_ratio"], "pass": cfg1 <= TARGETS["cfg1_ratio"]},
        "memory": {
            "value": memory_overhead,
            "limit": TARGETS["memory"],
            "pass": memory_overhead <= TARGETS["memory"],
            "total_with_weights": memory_overhead_total,
        },
    }

    log("")
    log(
        "| variant | rows | median ms/step | min ms/step | ×(a) paired [95 % CI] | ×(a) of medians | time overhead "
        "| peak MiB above weights | peak overhead vs (a) | counted GFLOP | IQR/median |"
    )
    log("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, label in VARIANTS.items():
        dash = key == "a"
        interval = "" if dash else f" [{ratio_ci[key][0]:.3f}, {ratio_ci[key][1]:.3f}]"
        time_overhead = "—" if dash else format(ratio[key] - 1, "+.2%")
        peak_overhead = "—" if dash else format(peak[key] / peak["a"] - 1, "+.2%")
        log(
            f"| {label} | {bench.variants[key].rows} | {medians[key] * 1e3:,.1f} | {min(times[key]) * 1e3:,.1f} | "
            f"{ratio[key]:.3f}{interval} | "
            f"{medians[key] / medians['a']:.3f} | {time_overhead} | {peak[key] / MIB:,.1f} | {peak_overhead} | "
            f"{flops['counted'][key] / 1e9:,.1f} | {spread(times[key]):.1%} |"
        )
    log("")
    log(
        "Peak memory above weights = the step's peak above what was live at its start + the variant's inputs + the K⁻/V⁻ cache "
        "((b), (e)), MiB: "
        + "; ".join(f"({k}) {v['step_peak'] / MIB:,.1f} + {v['resident'] / MIB:,.1f}" for k, v in memory.items())
        + (f"; the step peaks are reached in {sorted({v['peak_op'] for v in memory.values()})}" if memory["a"]["peak_op"] else "")
        + f". The K⁻/V⁻ cache holds {cache / MIB:,.2f} MiB. Weights {bench.weight_bytes / MIB:,.0f} MiB."
    )
    log(
        f"Analytic floor: NAG adds {floor['core_flops'] / 1e9:,.3f} GFLOP of attention core (QKᵀ and AV of {args.batch} positive "
        f"row(s) against {spec.negative_tokens} negative tokens in each of the {attn2} attn2) + {floor['elementwise_flops'] / 1e9:,.3f} "
        f"GFLOP elementwise (NAG combine {NAG_FLOPS_PER_Z}/element of Z, softmax {SOFTMAX_FLOPS_PER_SCORE}/score) = "
        f"{floor['fraction']:.3%} of (a)'s {floor['unet_flops_a'] / 1e9:,.1f} GFLOP, counted with FlopCounterMode (convolutions, "
        f"mm/addmm/bmm, SDPA; elementwise ops are not counted). Counted (b)−(a): {counted_extra / 1e9:,.3f} GFLOP."
    )
    log(
        f"Measured (b)/(a)−1 = {overhead:+.2%} (95 % CI [{low - 1:+.2%}, {high - 1:+.2%}] over the {len(stats['used']['b'])} of "
        f"{stats['rounds']} ABBA rounds quiet for (a) and (b); ratio of medians {medians['b'] / medians['a'] - 1:+.2%}, "
        f"of minimums {min(times['b']) / min(times['a']) - 1:+.2%}) vs floor {floor['fraction']:.3%}: measured/floor = "
        f"{targets['floor']['measured_over_floor']:.2f}. (e)/(a) = {cfg1:.3f} (FLOPs: "
        f"{flops['counted']['e'] / flops['counted']['a']:.3f}). Noise: (a) IQR/median {noise['a_iqr_over_median']:.2%} over all "
        f"steps, {stats['a_spread_used']:.2%} over its quiet rounds; slowest/fastest (a) step {noise['a_max_over_min']:.2f}."
    )
    log(
        "Checks: (b) uncond rows bit-identical to (a): {b}; (c) uncond rows bit-identical to (a): {c}; NAG moved (b)'s cond rows by "
        "{moved:.3g} (max |Δ| / max |(a)|); (e) vs (b) cond rows: {e:.2e}; (d) first 2B rows vs (a): {d:.2e}; (c) vs (b) cond rows "
        "(NAG after vs before the out-projection): {cb:.3g}; all finite: {finite}.".format(
            b=checks["b_uncond_bit_identical_to_a"],
            c=checks["c_uncond_bit_identical_to_a"],
            moved=checks["b_cond_changed_by_nag"],
            e=checks["e_vs_b_cond"],
            d=checks["d_vs_a"],
            cb=checks["c_vs_b_cond"],
            finite=checks["finite"],
        )
    )
    if checks["b_cond_changed_by_nag"] < 1e-4:
        log("WARNING: NAG did not change the cond rows: the host attention forward bypasses the hooks lib_nag relies on.")
    log("")
    verdict = {True: "PASS", False: "MISS"}
    log(f"Targets ({spec.name}, {resolution}², batch {args.batch}, {args.dtype}, {args.device}):")
    log(f"- (b)/(a) − 1 = {overhead:+.2%} ≤ {TARGETS['overhead']:.0%}: {verdict[targets['overhead']['pass']]}")
    log(
        f"- (b)/(a) − 1 = {overhead:+.2%} ≤ {TARGETS['floor_factor']}× floor = {floor_bound:.3%}: {verdict[targets['floor']['pass']]}"
        + (
            f" — within timing noise (±{noise_half_width:.2%}: the larger of the CI half-width and (a)'s IQR/median), "
            "so not meaningful at this noise"
            if targets["floor"]["within_noise"]
            else ""
        )
    )
    log(f"- (e)/(a) = {cfg1:.3f} ≤ {TARGETS['cfg1_ratio']}: {verdict[targets['cfg1_ratio']['pass']]}")
    log(
        f"- peak memory above weights, (b) vs (a): {memory_overhead:+.2%} ≤ {TARGETS['memory']:.0%}: "
        f"{verdict[targets['memory']['pass']]} (with the weights counted: {memory_overhead_total:+.3%})"
    )
    log(f"(measured in {measure_s:.0f} s)")
    if profile:
        log("")
        log(
            f"Profile of one (b) step ({profile['b_step_ms']:,.0f} ms under the profiler): guide_rows (negative branch + NAG combine) "
            f"ran {profile['guide_rows_calls']} times, {profile['guide_rows_ms']:,.1f} ms in all = "
            f"{profile['guide_rows_ms'] / profile['b_step_ms']:.2%} of the step. NAG adds {profile['aten_ops_added']} aten op calls "
            f"per step ({profile['aten_ops_added'] / max(attn2, 1):.1f} per attn2; nested calls included): "
            + ", ".join(f"{name.removeprefix('aten::')} +{n}" for name, n in list(profile["aten_ops_added_by_name"].items())[:12])
            + "."
        )
        log("| op inside guide_rows | self ms | calls |")
        log("|---|---:|---:|")
        for row in profile["inside_guide_rows"]:
            log(f"| {row['op']} | {row['self_ms']:,.2f} | {row['calls']} |")
        log("")

    result = {
        "model": spec.name,
        "spec": asdict(spec),
        "resolution": resolution,
        "latent": latent,
        "batch": args.batch,
        "dtype": args.dtype,
        "attention": args.attention,
        "repeats": repeats,
        "parameters": params,
        "attn2_modules": attn2,
        "weight_bytes": bench.weight_bytes,
        "cache_bytes": cache,
        "build_s": build_s,
        "measure_s": measure_s,
        "architecture_ok": architecture_ok,
        "variants": {
            key: {
                "label": label,
                "rows": bench.variants[key].rows,
                "median_ms": medians[key] * 1e3,
                "min_ms": min(times[key]) * 1e3,
                "ratio_to_a": ratio[key],
                "ratio_to_a_ci95": list(ratio_ci[key]),
                "ratio_of_medians": medians[key] / medians["a"],
                "times_ms": [value * 1e3 for value in times[key]],
                "iqr_over_median": spread(times[key]),
                "peak_above_weights_mib": peak[key] / MIB,
                "step_peak_mib": memory[key]["step_peak"] / MIB,
                "resident_mib": memory[key]["resident"] / MIB,
                "peak_overhead_vs_a": peak[key] / peak["a"] - 1,
                "counted_flops": flops["counted"][key],
            }
            for key, label in VARIANTS.items()
        },
        "floor": floor,
        "counted_extra_flops_b": counted_extra,
        "noise": noise,
        "checks": checks,
        "targets": targets,
        "profile": profile,
    }
    del bench
    gc.collect()
    return result


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd15,sdxl", help=f"comma-separated, of {', '.join(MODELS)} (default: sd15,sdxl)")
    parser.add_argument("--resolution", type=int, default=None, help="image side in pixels for every model (latent = /8)")
    parser.add_argument("--sd15-resolution", type=int, default=None, help="default 256 on CPU, 512 on CUDA")
    parser.add_argument("--sdxl-resolution", type=int, default=None, help="default 256 on CPU, 1024 on CUDA")
    parser.add_argument("--flux-resolution", type=int, default=None, help="default 1024 (4096 image tokens)")
    parser.add_argument(
        "--flux-hidden",
        type=int,
        default=None,
        help=f"Flux width, a multiple of {HEAD_DIM} (heads of {HEAD_DIM}); default 1024 on CPU (a forward of 1 + 2 blocks at 3072 "
        "takes ~35 s on 1 core), 3072 (Flux.1's) on CUDA",
    )
    parser.add_argument("--flux-blocks", default=None, help="Flux double,single blocks; default 1,2 on CPU, 19,38 (Flux.1's) on CUDA")
    parser.add_argument("--flux-negative-tokens", type=int, default=512, help="NAG negative's T5 tokens (default 512, as the prompt)")
    parser.add_argument("--sd35-resolution", type=int, default=None, help="default 1024 (4096 image tokens)")
    parser.add_argument(
        "--sd35-hidden",
        type=int,
        default=None,
        help=f"SD3.5 width, a multiple of {SD35_HEAD_DIM} (heads of {SD35_HEAD_DIM}); default 1024 on CPU, 2432 (SD3.5 Large's) on CUDA",
    )
    parser.add_argument("--sd35-blocks", type=int, default=None, help="SD3.5 joint blocks; default 2 on CPU, 38 (SD3.5 Large's) on CUDA")
    parser.add_argument(
        "--sd35-negative-tokens", type=int, default=333, help="NAG negative's tokens (default 333 = 77 CLIP + 256 T5, as the prompt)"
    )
    parser.add_argument("--batch", type=int, default=1, help="images B (default 1)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps per variant, even (default on CPU: SD1.5 10, SDXL 6, Flux and SD3.5 6; on CUDA 30)",
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed passes over the variants before timing, after the first (default CPU 0, CUDA 2)"
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="default fp32 on CPU, fp16 on CUDA")
    parser.add_argument(
        "--attention", choices=list(HOST_ATTENTION), default="a1111-sdp", help="host CrossAttention forward (default a1111-sdp)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep-malloc", action="store_true", help="do not set GLIBC_TUNABLES (see keep_freed_memory)")
    parser.add_argument("--profile", action="store_true", help="also profile one (a) and one (b) step and list what (b) adds")
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.warmup = (2 if cuda else 0) if args.warmup is None else args.warmup
    args.flux_hidden = args.flux_hidden or (FLUX.hidden_size if cuda else 1024)
    args.flux_blocks = tuple(int(n) for n in (args.flux_blocks or ("19,38" if cuda else "1,2")).split(","))
    if args.flux_hidden % HEAD_DIM or len(args.flux_blocks) != 2:
        parser.error(f"--flux-hidden must be a multiple of {HEAD_DIM} and --flux-blocks two numbers (double,single)")
    args.sd35_hidden = args.sd35_hidden or (SD35.hidden_size if cuda else 1024)
    args.sd35_blocks = args.sd35_blocks or (SD35.joint_blocks if cuda else 2)
    if args.sd35_hidden % SD35_HEAD_DIM or not 1 <= args.sd35_blocks <= args.sd35_hidden // SD35_HEAD_DIM:
        parser.error(f"--sd35-hidden must be a multiple of {SD35_HEAD_DIM} and --sd35-blocks at most --sd35-hidden / {SD35_HEAD_DIM}")
    args.models = [name.strip() for name in args.models.split(",") if name.strip()]
    unknown = [name for name in args.models if name not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    return args


def default_repeats(spec: UNetSpec | FluxSpec | SD35Spec, args: argparse.Namespace) -> int:
    if torch.device(args.device).type == "cuda":
        return 30
    return {SD15.name: 10, SDXL.name: 6, FLUX.name: 6, SD35.name: 6}.get(spec.name, 2)


def resolution_for(name: str, args: argparse.Namespace) -> int:
    own = getattr(args, f"{name.replace('-', '_')}_resolution", None)
    if own:
        return own
    if args.resolution:
        return args.resolution
    cuda = torch.device(args.device).type == "cuda"
    return {"sd15": 512 if cuda else 256, "sdxl": 1024 if cuda else 256, "flux": 1024, "sd35": 1024}.get(name, 64)


def header(args: argparse.Namespace) -> list[str]:
    device = torch.device(args.device)
    if device.type == "cuda":
        machine = f"CUDA {torch.cuda.get_device_name(device)}"
        memory = "torch.cuda.reset_peak_memory_stats + max_memory_allocated − memory_allocated at step start"
    else:
        machine = f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
        memory = (
            "torch.profiler(profile_memory=True): running sum of the CPU allocator's [memory] events (signed bytes) in time order, "
            "its maximum = peak bytes allocated by tensors during the step above what was live at its start (PyTorch's CPU allocator "
            "does not cache); tests/test_bench.py checks the method on known allocations"
        )
    return [
        "# NAG cost per UNet step (tests/bench.py)",
        "",
        f"Machine: {machine}; torch {torch.__version__}, Python {platform.python_version()}.",
        "UNets: the real ldm UNetModel with the full SD1.5 / SDXL architectures and random weights (no checkpoint); SDXL built "
        "at transformer depth 10, its level-1 transformers cut to 2 blocks, the context passed as a list (ldm indexes it per block), "
        "sgm's `sequential` label embedding over the 2816-wide vector.",
        f"Host attention: '{args.attention}' ({HOST_ATTENTION_TEXT[args.attention]}).",
        f"NAG: scale {NAG_PARAMS.scale:g}, tau {NAG_PARAMS.tau:g}, alpha {NAG_PARAMS.alpha:g}; NAG negative of 77 tokens, one row per "
        "image; cond rows first, then uncond (A1111's layout).",
        "Timing: all variants in one process, torch.no_grad(); the first step of every variant (FLOP count, output checks) and "
        f"{args.warmup} more pass(es) untimed, K⁻/V⁻ cache warm; then ABBA rounds (the variants in one order, then reversed; "
        "the start rotated each round), two steps per variant per round"
        + ("; CPU denormals flushed to zero" if device.type == "cpu" else "; CUDA synchronised around each step")
        + ". Median (and min) ms/step per variant. Ratios to (a), used by the targets: the median over rounds of (the variant's "
        "two steps) / ((a)'s two steps), which cancels drifts in the machine's speed, over the rounds where both are quiet (each "
        f"step within {QUIET:.0%} of its variant's fastest) when there are any; 95 % CI from order statistics (min–max under 6 rounds).",
        f"Peak memory: {memory}. Reported: the variant's inputs + persistent NAG state (the K⁻/V⁻ cache, for (b)/(e)) + that "
        "step peak = peak above the weights.",
        *(
            [
                f"CPU memory: GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES') or 'unset'}; with "
                f"'{MALLOC_TUNABLES}' freed memory stays in the process, so steps do not time the VM's page faults "
                "(see keep_freed_memory; --keep-malloc to measure without)."
            ]
            if device.type == "cpu"
            else []
        ),
        "Defaults: on CPU SD1.5 and SDXL at 256² (latent 32²), batch 1, fp32, 10 (SD1.5) and 6 (SDXL) timed steps per variant, "
        "about 6 minutes on 2 cores when the machine is quiet (SD1.5 (a) ≈ 1.6 s, SDXL (a) ≈ 5 s per step); on CUDA SD1.5 at 512², "
        "SDXL at 1024², fp16, 30 steps.",
        "Flux (--models flux): Forge's Flux stand-in with random weights at 1024²-shaped tokens, CFG 1 (cond_or_uncond [0]), NAG "
        f"negative of {args.flux_negative_tokens} T5 tokens; width {args.flux_hidden} ({args.flux_hidden // HEAD_DIM} heads of "
        f"{HEAD_DIM}; Flux.1: 3072), {args.flux_blocks[0]} double + {args.flux_blocks[1]} single blocks (Flux.1: 19 + 38). "
        "On CPU the default is 1024 wide, 1 + 2 blocks, 6 steps per variant (a few minutes); on CUDA Flux.1's full size. Timed "
        "like the UNets, ratios to (f); no memory measurement.",
        "SD3.5 (--models sd35): Forge's MMDiT-X stand-in with random weights at 1024²-shaped tokens, CFG 1 (cond_or_uncond [0], "
        f"SD3.5 Large Turbo's case), prompt and NAG negative of {args.sd35_negative_tokens} tokens (Forge: 77 CLIP + 256 T5); width "
        f"{args.sd35_hidden} ({args.sd35_hidden // SD35_HEAD_DIM} heads of {SD35_HEAD_DIM}; SD3.5 Large: 2432), {args.sd35_blocks} "
        "joint blocks, the last pre_only (SD3.5 Large: 38). On CPU the default is 1024 wide, 2 blocks, 6 steps per variant; on CUDA "
        "SD3.5 Large's full size. Timed like Flux, ratios to (i); no memory measurement.",
    ]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    flush = torch.device(args.device).type == "cpu" and torch.set_flush_denormal(True)
    try:
        return run(args)
    finally:
        if flush:
            torch.set_flush_denormal(False)


def run(args: argparse.Namespace) -> dict[str, Any]:
    for line in header(args):
        print(line)
    results = {}
    for name in args.models:
        if isinstance(MODELS[name], (FluxSpec, SD35Spec)):
            negative_tokens = args.flux_negative_tokens if isinstance(MODELS[name], FluxSpec) else args.sd35_negative_tokens
            results[name] = run_dit_model(dit_spec_for(name, args), resolution_for(name, args), negative_tokens, args)
        else:
            results[name] = run_model(MODELS[name], resolution_for(name, args), args)
        sys.stdout.flush()
    report = {
        "machine": {
            "device": args.device,
            "device_name": torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else platform.processor(),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "targets": TARGETS,
        "models": results,
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"\nJSON written to {args.json}")
    return report


MALLOC_TUNABLES = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=68719476736"


def keep_freed_memory() -> None:
    """Re-run this script with glibc's malloc told never to hand freed memory back to the OS.

    PyTorch's CPU allocator does not cache: every op output is a fresh malloc, and glibc serves
    large ones with mmap and returns them on free. Each step then first-touches gigabytes of
    new pages; on this kind of VM that made an SD1.5 step ~5× slower and its time mostly page
    faults (an artefact: a CUDA host's caching allocator pays nothing of the kind). Linux only;
    ``--keep-malloc`` turns it off.
    """
    if sys.platform != "linux" or "--keep-malloc" in sys.argv or MALLOC_TUNABLES in os.environ.get("GLIBC_TUNABLES", ""):
        return
    tunables = ":".join(filter(None, (os.environ.get("GLIBC_TUNABLES"), MALLOC_TUNABLES)))
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "GLIBC_TUNABLES": tunables})


if __name__ == "__main__":
    keep_freed_memory()
    main()
