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

``--models chroma`` (Forge's Chroma at Flux.1's width) and Forge Neo's families (``qwen``, ``zimage``,
``lumina2``, ``flux2``, ``ernie``, ``krea``, ``wan``) build their stand-ins at their real width, on CPU at
a reduced depth (``--dit-size full``: the full model, the CUDA default), at 1024²-shaped tokens and CFG 1:
(off) NAG off, (nag) NAG as this project does it, (extra) an extra full pass; Chroma also (full-stream),
NAG with the NAG rows a whole stream in the single blocks (the shortcut off). Each family's spec, floor
and variants are in bench_dit.py (Chroma) and bench_neo.py; the framework in bench_dit.py, what every
benchmark shares (random weights, FLOP counter, timing) in bench_common.py.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from bench_common import (
    DTYPES,
    MIB,
    NAG_FLOPS_PER_Z,
    NAG_PARAMS,
    QUIET,
    SOFTMAX_FLOPS_PER_SCORE,
    count_params,
    counted_flops,
    cpu_step_peak_and_op,
    elapsed,
    init_weights,
    padded_to_longest,
    spread,
    synchronize,
    time_interleaved,
    timing_stats,
)
from bench_dit import (
    CHROMA,
    CHROMA_CPU,
    DIT_BENCHES,
    FLUX,
    HEAD_DIM,
    SD35,
    SD35_HEAD_DIM,
    TINY_CHROMA,
    TINY_FLUX,
    TINY_SD35,
    FluxSpec,
    SD35Spec,
    run_dit_model,
)
from bench_neo import NEO_BENCHES, NEO_SIZES, NEO_TINY
from ldm.modules.attention import CrossAttention, SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import linear
from torch import nn

from lib_nag.attention import CrossAttentionNag, NegativeKV, PositiveRows, attention
from lib_nag.guidance import nag_combine

VARIANTS = {
    "a": "(a) NAG off, CFG batch",
    "b": "(b) NAG on (this project)",
    "c": "(c) NAG naive (2nd attn2 call)",
    "d": "(d) extra UNet pass (3B rows)",
    "e": "(e) NAG on, CFG 1, uncond skipped",
}
TARGETS = {"overhead": 0.03, "floor_factor": 1.5, "cfg1_ratio": 0.55, "memory": 0.02}


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


# The transformers measured at their real width: (the reduced depth, the CPU default; the full model, the CUDA default).
SIZES: dict[str, tuple[Any, Any]] = {"chroma": (CHROMA_CPU, CHROMA)} | NEO_SIZES
BENCHES = DIT_BENCHES | NEO_BENCHES
MODELS: dict[str, Any] = {
    "sd15": SD15,
    "sdxl": SDXL,
    "flux": FLUX,
    "sd35": SD35,
    **{name: full for name, (_, full) in SIZES.items()},
    "tiny-sd1": TINY_SD1,
    "tiny-sdxl": TINY_SDXL,
    "tiny-flux": TINY_FLUX,
    "tiny-sd35": TINY_SD35,
    "tiny-chroma": TINY_CHROMA,
    **NEO_TINY,
}


def dit_spec_for(name: str, args: argparse.Namespace) -> Any:
    """``flux`` and ``sd35`` at the width, depth and NAG-negative length the options give; the others at the
    size ``--dit-size`` picks; the tiny ones as they are."""
    spec = MODELS[name]
    if name in SIZES:
        sized = SIZES[name][args.dit_size == "full"]
        return replace(sized, frames=args.wan_frames) if name == "wan" else sized
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
    parser.add_argument(
        "--dit-size",
        choices=("reduced", "full"),
        default=None,
        help=f"size of {', '.join(SIZES)}: their real width at a reduced depth (the CPU default) or the full model (the CUDA default)",
    )
    parser.add_argument("--batch", type=int, default=1, help="images B (default 1)")
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps per variant, even (default on CPU: SD1.5 10, SDXL 6, Flux and SD3.5 6, Wan 10, Qwen-Image 6, Lumina 2 and "
        "ERNIE-Image 4, the others 2; on CUDA 30)",
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
    parser.add_argument("--wan-frames", type=int, default=1, help="Wan's latent frames (default 1: a 1024²-shaped frame, 4096 tokens)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one (a) and one (b) step and list what (b) adds; for wan, one (off) and one (nag) step and the kernels' rates",
    )
    parser.add_argument("--json", type=Path, default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("fp16" if cuda else "fp32")
    args.warmup = (2 if cuda else 0) if args.warmup is None else args.warmup
    args.dit_size = args.dit_size or ("full" if cuda else "reduced")
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


def default_repeats(spec: Any, args: argparse.Namespace) -> int:
    if torch.device(args.device).type == "cuda":
        return 30
    # Each run a few minutes on a core: one step of the reduced Chroma, Z-Image, Flux.2 or Krea takes 20-40 s.
    per_model = {SD15.name: 10, SDXL.name: 6, FLUX.name: 6, SD35.name: 6, "Qwen-Image": 6, "Lumina 2": 4, "ERNIE-Image": 4, "Wan 1.3B": 10}
    return per_model.get(spec.name, 2)


def resolution_for(name: str, args: argparse.Namespace) -> int:
    own = getattr(args, f"{name.replace('-', '_')}_resolution", None)
    if own:
        return own
    if args.resolution:
        return args.resolution
    cuda = torch.device(args.device).type == "cuda"
    defaults = {"sd15": 512 if cuda else 256, "sdxl": 1024 if cuda else 256, "flux": 1024, "sd35": 1024}
    return defaults.get(name, 1024 if name in SIZES else 64)


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
        f"Chroma and Forge Neo's families (--models {','.join(SIZES)}): their stand-ins with random weights at 1024²-shaped tokens, "
        f"CFG 1, at their {args.dit_size} size (--dit-size: reduced, their real width at a reduced depth, is the CPU default; full, "
        "the CUDA default), the prompt and the NAG negative of the family's usual length; each section gives the blocks, widths and "
        "tokens. Timed like Flux, ratios to (off), with NAG off, NAG as this project does it and an extra full pass; targets: NAG's "
        "extra cost within 1.2× its analytic floor and ≤ 0.4 of an extra pass (issue 15), Wan's ≤ +5 % per step (issue 16).",
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
        if type(MODELS[name]) in BENCHES:
            spec = dit_spec_for(name, args)
            negative_tokens = {FluxSpec: args.flux_negative_tokens, SD35Spec: args.sd35_negative_tokens}.get(
                type(spec), spec.negative_tokens
            )
            repeats = args.repeats or default_repeats(spec, args)
            results[name] = run_dit_model(BENCHES[type(spec)], spec, resolution_for(name, args), negative_tokens, repeats, args)
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
