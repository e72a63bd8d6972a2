"""The transformer benchmarks of tests/bench.py: a model at CFG 1 (one cond row per image) with NAG
off, NAG as this project does it and an extra full pass (what CFG costs), its analytic floor of NAG's
extra FLOPs checked against the FLOP counter, and the report (``DiTBench``, ``run_dit_model``); here
too the families on Forge main's Flux code (Flux.1, Chroma) and SD3.5's MMDiT-X. Forge Neo's families
are in bench_neo.py."""

from __future__ import annotations

import argparse
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
from backend.nn.flux import IntegratedFluxTransformer2DModel
from backend.nn.mmditx import MMDiTX
from bench_common import (
    DTYPES,
    MIB,
    NAG_FLOPS_PER_Z,
    NAG_PARAMS,
    SOFTMAX_FLOPS_PER_SCORE,
    count_params,
    counted_flops,
    elapsed,
    materialized,
    padded_to_longest,
    spread,
    time_interleaved,
    timing_stats,
)
from torch import nn

from lib_nag.models.flux import nag_forward as flux_nag_forward
from lib_nag.models.mmdit import nag_forward as mmdit_nag_forward
from lib_nag.webui.forge_patcher import forge_rows

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
    spec: FluxSpec | SD35Spec,
    resolution: int,
    negative_tokens: int,
    repeats: int,
    args: argparse.Namespace,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    started = time.perf_counter()
    bench = DIT_BENCHES[type(spec)](spec, resolution, args.batch, args.device, DTYPES[args.dtype], args.seed)
    build_s = time.perf_counter() - started
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
