"""The transformer benchmarks of tests/bench.py: a model at CFG 1 (one cond row per image) with NAG
off, NAG as this project does it and an extra full pass (what CFG costs), its analytic floor of NAG's
extra FLOPs checked against the FLOP counter, and the report (``DiTBench``, ``run_dit_model``); here
too the families on Forge main's Flux code (Flux.1, Chroma) and SD3.5's MMDiT-X. Forge Neo's families
are in bench_neo.py."""

from __future__ import annotations

import argparse
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any
from unittest import mock

import bench_common  # noqa: F401  (imported first: it puts the stand-ins on the path)
import torch
from backend.nn.chroma import IntegratedChromaTransformer2DModel
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
from lib_nag.models.flux_blocks import ChromaModulations
from lib_nag.models.mmdit import nag_forward as mmdit_nag_forward
from lib_nag.webui.conditioning import crossattn
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
CHROMA_VARIANTS = {
    "off": "(off) NAG off, the model's own forward",
    "nag": "(nag) NAG on (this project: the NAG rows' text alone in the single blocks)",
    "full-stream": "(full-stream) NAG on, the NAG rows a whole stream in the single blocks",
    "extra": "(extra) extra full pass (2B rows, as CFG)",
}
DIT_TARGETS = {"floor_factor": 1.2, "extra_pass_fraction": 0.75}
SHORTCUT_TARGETS = {"floor_factor": 1.2, "extra_pass_fraction": 0.4}  # issue 15: where NAG's rows need no second image stream
SIGMA, FLUX_GUIDANCE = 0.5, 3.5  # a mid-schedule sigma; Flux.1-dev's usual distilled guidance
HEAD_DIM = 128  # Flux.1's: 3072 wide, 24 heads; a reduced width keeps it (and the rotary axes 16 + 56 + 56)
SD35_HEAD_DIM = 64  # MMDiT's "magic": hidden 64·depth, depth heads of 64


class PatchTokens:
    """What Flux's and SD3's specs share: 16-channel latents in 2×2 patches, an MLP of ``mlp_ratio``."""

    hidden_size: int
    mlp_ratio: float
    latent_channels: int

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @staticmethod
    def image_tokens(resolution: int) -> int:
        return ((resolution // 8 + 1) // 2) ** 2

    def latent(self, resolution: int) -> tuple[int, ...]:
        """One image's latent: 8× smaller than the image."""
        return self.latent_channels, resolution // 8, resolution // 8


@dataclass(frozen=True)
class FluxBlocks(PatchTokens):
    """Flux.1's block stacks, as Flux.1 and Chroma have them: 19 double + 38 single blocks, 3072 wide (24
    heads of 128), T5-XXL text of 4096, 16-channel latents in 2×2 patches."""

    name: str
    hidden_size: int
    num_heads: int
    double_blocks: int
    single_blocks: int
    axes_dim: tuple[int, ...]
    context_dim: int = 4096
    latent_channels: int = 16
    mlp_ratio: float = 4.0
    prompt_tokens: int = 512
    negative_tokens: int = 512


@dataclass(frozen=True)
class FluxSpec(FluxBlocks):
    """Widths and depths of Forge's ``IntegratedFluxTransformer2DModel`` (Flux.1: its blocks, CLIP-L pooled 768)."""

    pooled_dim: int = 768


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


@dataclass(frozen=True)
class ChromaSpec(FluxBlocks):
    """Widths and depths of Forge's ``IntegratedChromaTransformer2DModel`` (Chroma: Flux.1's blocks without
    their modulation layers and no pooled vector; the modulations from the distilled guidance layer, 64 →
    5120 wide in 5 layers → one vector per block modulation)."""

    approximator_width: int = 5120
    approximator_layers: int = 5

    @property
    def modulation_vectors(self) -> int:
        """The distilled guidance layer's vectors per row: 12 per double block, 3 per single, 2 for the final layer."""
        return 12 * self.double_blocks + 3 * self.single_blocks + 2


FLUX = FluxSpec("Flux.1", 3072, 24, 19, 38, (16, 56, 56))
TINY_FLUX = FluxSpec("tiny Flux", 64, 4, 1, 2, (4, 6, 6), 32, pooled_dim=12, latent_channels=4, prompt_tokens=7, negative_tokens=5)
SD35 = SD35Spec("SD3.5 Large", 2432, 38)
TINY_SD35 = SD35Spec("tiny SD3.5", 192, 2, context_dim=24, pooled_dim=12, prompt_tokens=7, negative_tokens=5)
CHROMA = ChromaSpec("Chroma", 3072, 24, 19, 38, (16, 56, 56))
CHROMA_CPU = replace(CHROMA, double_blocks=1, single_blocks=2)  # Flux.1's width and 1:2 ratio; ~30 s per forward on a core
TINY_CHROMA = ChromaSpec(
    "tiny Chroma", 64, 4, 1, 2, (4, 6, 6), 32, latent_channels=4, approximator_width=32, approximator_layers=2, prompt_tokens=7,
    negative_tokens=5,
)  # fmt: skip


def build_flux(spec: FluxSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The Forge Flux stand-in (tests/forge/backend/nn/flux.py) with ``spec``'s sizes and random weights."""
    with torch.device("meta"):
        model = IntegratedFluxTransformer2DModel(
            spec.latent_channels, spec.pooled_dim, spec.context_dim, spec.hidden_size, spec.mlp_ratio, spec.num_heads,
            spec.double_blocks, spec.single_blocks, list(spec.axes_dim), 10000, qkv_bias=True, guidance_embed=True,
        )  # fmt: skip
    return materialized(model, device, dtype, seed)


def build_chroma(spec: ChromaSpec, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """The Forge Chroma stand-in (tests/forge/backend/nn/chroma.py) with ``spec``'s sizes and random weights."""
    with torch.device("meta"):
        model = IntegratedChromaTransformer2DModel(
            spec.latent_channels, spec.context_dim, spec.hidden_size, spec.mlp_ratio, spec.num_heads, spec.double_blocks,
            spec.single_blocks, list(spec.axes_dim), 10000, qkv_bias=True, guidance_out_dim=spec.hidden_size,
            guidance_hidden_dim=spec.approximator_width, guidance_n_layers=spec.approximator_layers,
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


def attention_flops(spec: Any, tokens: int) -> int:
    """QKᵀ and AV of one joint attention over ``tokens``."""
    return 4 * tokens * tokens * spec.hidden_size


def _single_block_flops(spec: FluxSpec, tokens: int) -> int:
    """One row of a single-stream block over ``tokens``: its stream, modulation and attention."""
    return _stream_flops(spec, tokens) + 2 * spec.hidden_size * 3 * spec.hidden_size + attention_flops(spec, tokens)


def _text_embedding_flops(spec: FluxSpec | SD35Spec, text_tokens: int) -> int:
    """The context embedding (txt_in / context_embedder) on the text tokens and the pooled vector's (vector_in / y_embedder)."""
    d = spec.hidden_size
    return 2 * text_tokens * spec.context_dim * d + 2 * (spec.pooled_dim * d + d * d)


def elementwise_flops(spec: Any, image_tokens: int, blocks: int, batch: int) -> int:
    """The NAG combine on the image tokens and the softmax of the second attention, in ``blocks`` blocks."""
    joint = spec.negative_tokens + image_tokens
    per_block = NAG_FLOPS_PER_Z * image_tokens * spec.hidden_size + SOFTMAX_FLOPS_PER_SCORE * spec.num_heads * joint * joint
    return batch * blocks * per_block


def floor_of(parts: dict[str, int], batch: int, matmul: int, elementwise: int) -> dict[str, int]:
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
    per_double = _stream_flops(spec, text) + 2 * d * 6 * d + attention_flops(spec, joint)
    per_single = _single_block_flops(spec, joint)
    embeddings = _text_embedding_flops(spec, text)
    matmul = batch * (embeddings + spec.double_blocks * per_double + spec.single_blocks * per_single)
    elementwise = elementwise_flops(spec, image_tokens, spec.double_blocks + spec.single_blocks, batch)
    return floor_of({"per_double_block": per_double, "per_single_block": per_single, "embeddings": embeddings}, batch, matmul, elementwise)


def flux_pass_flops(spec: FluxSpec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows, analytically (what (h) adds to (f))."""
    d, patch, text = spec.hidden_size, 4 * spec.latent_channels, max(spec.prompt_tokens, spec.negative_tokens)
    joint = text + image_tokens
    per_double = _stream_flops(spec, joint) + 2 * 2 * d * 6 * d + attention_flops(spec, joint)
    embeddings = 2 * image_tokens * patch * d + _text_embedding_flops(spec, text) + 2 * 2 * (256 * d + d * d)  # + time_in, guidance_in
    final = 2 * d * 2 * d + 2 * image_tokens * d * patch
    return batch * (embeddings + spec.double_blocks * per_double + spec.single_blocks * _single_block_flops(spec, joint) + final)


def chroma_nag_flops(spec: ChromaSpec, image_tokens: int, batch: int = 1, text_alone: bool = True) -> dict[str, int]:
    """The analytic floor of NAG's extra FLOPs over (off) for ``batch`` positive rows (2 FLOPs per multiply-add).

    Per double block: the NAG text stream's linear layers on the negative's tokens and the second joint
    attention over [negative text; image]. Per single block: the NAG rows' linear1 and linear2 on their
    text alone (``text_alone``, NAG's shortcut: their image tokens would be their positive rows') or on
    [negative text; image] (the authors' whole stream, which Flux's floor counts), and their attention
    over [negative text; image]. Before the blocks: txt_in on the negative. Chroma's modulations carry no
    prompt: the NAG rows take their positive rows' (no modulation layer runs for them). The elementwise
    part as for Flux.
    """
    text, joint = spec.negative_tokens, spec.negative_tokens + image_tokens
    per_double = _stream_flops(spec, text) + attention_flops(spec, joint)
    per_single = _stream_flops(spec, text if text_alone else joint) + attention_flops(spec, joint)
    embeddings = 2 * text * spec.context_dim * spec.hidden_size
    matmul = batch * (embeddings + spec.double_blocks * per_double + spec.single_blocks * per_single)
    elementwise = elementwise_flops(spec, image_tokens, spec.double_blocks + spec.single_blocks, batch)
    return floor_of({"per_double_block": per_double, "per_single_block": per_single, "embeddings": embeddings}, batch, matmul, elementwise)


def chroma_pass_flops(spec: ChromaSpec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows, analytically (what (extra) adds to (off))."""
    d, patch, text = spec.hidden_size, 4 * spec.latent_channels, max(spec.prompt_tokens, spec.negative_tokens)
    joint, width, vectors = text + image_tokens, spec.approximator_width, spec.modulation_vectors
    approximator = 2 * vectors * (64 * width + spec.approximator_layers * 2 * width * width + width * d)
    embeddings = 2 * image_tokens * patch * d + approximator + 2 * text * spec.context_dim * d
    per_block = _stream_flops(spec, joint) + attention_flops(spec, joint)  # double (image and text streams) = single
    final = 2 * image_tokens * d * patch
    return batch * (embeddings + (spec.double_blocks + spec.single_blocks) * per_block + final)


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
    per_block = _stream_flops(spec, text) + 2 * d * 6 * d + attention_flops(spec, joint)
    last_block = _last_context_flops(spec, text) + attention_flops(spec, joint)
    embeddings = _text_embedding_flops(spec, text)
    matmul = batch * (embeddings + (spec.joint_blocks - 1) * per_block + last_block)
    elementwise = elementwise_flops(spec, image_tokens, spec.joint_blocks, batch)
    return floor_of({"per_joint_block": per_block, "last_joint_block": last_block, "embeddings": embeddings}, batch, matmul, elementwise)


def sd35_pass_flops(spec: SD35Spec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows, analytically (what (k) adds to (i))."""
    d, patch, text = spec.hidden_size, 4 * spec.latent_channels, max(spec.prompt_tokens, spec.negative_tokens)
    joint, image_block = text + image_tokens, _stream_flops(spec, image_tokens) + 2 * d * 6 * d
    per_block = _stream_flops(spec, text) + 2 * d * 6 * d + image_block + attention_flops(spec, joint)
    last_block = _last_context_flops(spec, text) + image_block + attention_flops(spec, joint)
    embeddings = 2 * image_tokens * patch * d + _text_embedding_flops(spec, text) + 2 * (256 * d + d * d)  # + t_embedder
    final = 2 * d * 2 * d + 2 * image_tokens * d * patch
    return batch * (embeddings + (spec.joint_blocks - 1) * per_block + last_block + final)


class DiTBench(ABC):
    """A transformer at CFG 1 (one cond row per image, ``cond_or_uncond`` [0]) and its variants, in the
    order of ``variants``: NAG off first, NAG as this project does it second (a family may measure more
    NAG variants after it), an extra full pass with the NAG negative as a second prompt last."""

    variants: dict[str, str]
    row_arguments: tuple[str, ...]  # the call's per-row arguments besides the conditioning
    full_model: Any  # the spec at full size
    nag_flops: Callable[..., dict[str, int]]  # (spec, image tokens, batch): the analytic floor of NAG's extra FLOPs
    pass_flops: Callable[..., int]  # (spec, image tokens, batch): the matmul FLOPs of one forward
    targets: dict[str, float] = DIT_TARGETS

    def __init__(
        self,
        spec: Any,
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

        sigmas = torch.full((batch,), SIGMA, device=self.device, dtype=self.dtype)
        cond = {"x": randn(batch, *spec.latent(resolution))} | self.conditioning(randn, spec.prompt_tokens)
        cond |= {"transformer_options": {"cond_or_uncond": [0], "sigmas": sigmas}} | self.call_arguments(sigmas)
        negative = self.nag_negative(self.conditioning(randn, spec.negative_tokens))
        self.off, self.nag_key, *_, self.extra = self.variants
        self.calls = {
            self.off: (self.model, cond),
            **{key: (forward, cond) for key, forward in self.nag_forwards(lambda: negative).items()},
            self.extra: (self.model, self._extra_pass(cond, negative)),
        }

    @abstractmethod
    def build(self, seed: int) -> nn.Module: ...

    def conditioning(self, randn: Callable[..., torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
        """A prompt of ``tokens`` tokens as the model's call takes it: its context (and pooled vector)."""
        return {"context": randn(self.batch, tokens, self.spec.context_dim)}

    def nag_negative(self, conditioning: dict[str, torch.Tensor]) -> Any:
        """The NAG negative as the family's pass hands it to NAG (here the context tensor)."""
        return conditioning["context"]

    @abstractmethod
    def call_arguments(self, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
        """The call's timestep (and guidance) arguments, as Forge passes them."""

    @abstractmethod
    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        """The model's forward with NAG as this project does it."""

    def nag_forwards(self, negative: Callable[[], Any]) -> dict[str, Callable[..., torch.Tensor]]:
        """Every NAG variant's forward, by key (here only NAG as this project does it)."""
        return {self.nag_key: self.nag(negative)}

    def nag_flops_of(self, key: str, spec: Any, image_tokens: int, batch: int = 1) -> dict[str, int]:
        """The analytic floor of NAG variant ``key`` for ``spec``."""
        return type(self).nag_flops(spec, image_tokens, batch)

    def floor(self, key: str | None = None) -> dict[str, int]:
        return self.nag_flops_of(key or self.nag_key, self.spec, self.image_tokens, self.batch)

    def extra_pass_flops(self) -> int:
        return type(self).pass_flops(self.spec, self.image_tokens, self.batch)

    def full_model_floor_over_extra_pass(self, negative_tokens: int, key: str | None = None) -> float:
        """The floor over the extra pass for the full-size model at 1024²."""
        full, tokens = replace(self.full_model, negative_tokens=negative_tokens), self.full_model.image_tokens(1024)
        return self.nag_flops_of(key or self.nag_key, full, tokens)["floor_flops"] / type(self).pass_flops(full, tokens)

    @abstractmethod
    def describe(self) -> tuple[str, str]:
        """The blocks and width, for the heading; the full model's, for the floor's comparison."""

    @abstractmethod
    def floor_text(self, floor: dict[str, Any], key: str) -> str:
        """What the floor of NAG variant ``key`` counts, per block."""

    def profile(self, medians: dict[str, float]) -> list[str]:
        """Lines on where NAG's extra time goes (``--profile``; ``medians``: each variant's median step, s)."""
        return op_profile(self, medians)

    def _extra_pass(self, cond: dict[str, Any], negative: Any) -> dict[str, Any]:
        """The cond rows and one row per image with the NAG negative as its prompt, in one call."""
        rows = {name: torch.cat((cond[name], cond[name])) for name in ("x", *self.row_arguments)}
        context = torch.cat(padded_to_longest(cond["context"], crossattn(negative)))
        options = {"cond_or_uncond": [0, 1], "sigmas": cond["transformer_options"]["sigmas"]}
        pooled = {"y": torch.cat((cond["y"], negative["vector"]))} if "y" in cond else {}
        return rows | {"context": context} | pooled | {"transformer_options": options}

    def rows(self, key: str) -> int:
        return self.calls[key][1]["x"].shape[0]

    def run(self, key: str) -> torch.Tensor:
        forward, arguments = self.calls[key]
        with torch.no_grad():
            return forward(**arguments)

    def timed(self, key: str) -> float:
        return elapsed(lambda: self.run(key), self.device)

    def checks(self, outputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        base, b = outputs[self.off].float(), self.batch

        def relative(x: torch.Tensor, y: torch.Tensor) -> float:
            return ((x.float() - y).abs().max() / y.abs().max().clamp_min(1e-30)).item()

        moved = {f"{key}_changed_by_nag": relative(outputs[key], base) for key in self.nag_keys}
        return moved | {
            f"{self.extra}_cond_rows_vs_{self.off}": relative(outputs[self.extra][:b], base),
            "finite": all(bool(torch.isfinite(out).all()) for out in outputs.values()),
        }

    @property
    def nag_keys(self) -> list[str]:
        return list(self.variants)[1:-1]


OP_KINDS = {  # the kind of an op (and of every op it calls), by the profiler's name
    "aten::scaled_dot_product_attention": "attention (SDPA)",
    "aten::mm": "matmuls",
    "aten::addmm": "matmuls",
    "aten::bmm": "matmuls",
    "aten::copy_": "copies (copy_, cat, index)",
    "aten::cat": "copies (copy_, cat, index)",
    "aten::index_select": "copies (copy_, cat, index)",
    "aten::index_copy_": "copies (copy_, cat, index)",
}
OTHER_OPS = "the rest (elementwise, norms, RoPE, …)"


def _op_flops(name: str, shapes: list) -> int:
    """The FLOPs of a matmul or SDPA event from its input shapes (2 per multiply-add)."""
    if name == "aten::scaled_dot_product_attention":
        (batch, heads, queries, width), keys = shapes[0], shapes[1][-2]
        return 4 * batch * heads * queries * keys * width
    if name in ("aten::mm", "aten::addmm"):
        first, second = shapes[:2] if name == "aten::mm" else shapes[1:3]  # addmm: bias, mat1, mat2, beta, alpha
        return 2 * first[0] * first[1] * second[1]
    if name == "aten::bmm":
        return 2 * math.prod(shapes[0]) * shapes[1][-1]
    return 0


def op_time_by_kind(events: Any) -> dict[str, tuple[float, int]]:
    """Self time (ms) and FLOPs by kind of op: every op counts once, in the kind of its outermost ancestor
    that has one (the copies inside a matmul are the matmul's)."""
    kinds: dict[str, tuple[float, int]] = {}
    for event in events:
        kind, flops, ancestor = OTHER_OPS, 0, event
        while ancestor is not None:
            if ancestor.name in OP_KINDS:
                kind = OP_KINDS[ancestor.name]
                flops = _op_flops(event.name, event.input_shapes) if ancestor is event else 0
            ancestor = ancestor.cpu_parent
        ms, counted = kinds.get(kind, (0.0, 0))
        kinds[kind] = (ms + event.self_cpu_time_total / 1e3, counted + flops)
    return kinds


def op_profile(bench: DiTBench, medians: dict[str, float]) -> list[str]:
    """Where (nag)'s extra time goes, by kind of op: one (off) and one (nag) step under torch.profiler (input
    shapes recorded), each op's self time summed by kind (SDPA, matmuls, copies, the rest), and the rate
    (GFLOP/s) of each kind's work in (off) and of what (nag) adds. One step each: the differences carry the
    step-to-step noise; the kinds' rates tell NAG's overhead (copies, elementwise) from the kernels'
    efficiency (attention runs slower per FLOP than matmuls on a CPU)."""
    off, nag = bench.off, bench.nag_key
    profiled = {}
    for key in (off, nag):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as prof:
            bench.run(key)
        profiled[key] = op_time_by_kind(prof.events())
    kinds = [kind for kind in (*dict.fromkeys(OP_KINDS.values()), OTHER_OPS) if kind in profiled[off] or kind in profiled[nag]]

    def rate(ms: float, flops: int) -> str:
        return f"{flops / ms / 1e6:,.0f}" if flops and ms > 0 else "—"

    rows = []
    for kind in kinds:
        (off_ms, off_flops), (nag_ms, nag_flops) = profiled[off].get(kind, (0.0, 0)), profiled[nag].get(kind, (0.0, 0))
        added_ms, added_flops = nag_ms - off_ms, nag_flops - off_flops
        rows.append(
            f"| {kind} | {off_ms:,.0f} | {rate(off_ms, off_flops)} | {nag_ms:,.0f} | {added_ms:+,.0f} | {added_flops / 1e9:,.1f} | "
            f"{rate(added_ms, added_flops)} |"
        )
    totals = [sum(ms for ms, _ in profiled[key].values()) for key in (off, nag)]
    return [
        "",
        f"Profile (--profile) of one ({off}) and one ({nag}) step by kind of op (self time; FLOPs from the ops' shapes): "
        f"{totals[0]:,.0f} and {totals[1]:,.0f} ms of ops ({totals[1] / totals[0] - 1:+.1%}; the timed medians: "
        f"{medians[nag] / medians[off] - 1:+.1%}).",
        "",
        f"| kind | ({off}) ms | ({off}) GFLOP/s | ({nag}) ms | added ms | added GFLOP | added GFLOP/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *rows,
    ]


def patched(owner: Any, name: str, value: Any) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """A forward that runs with ``owner.name`` set to ``value`` for the call (a model's instance method, a
    class attribute), then set back."""

    def wrap(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        def run(**arguments: Any) -> torch.Tensor:
            with mock.patch.object(owner, name, value):
                return forward(**arguments)

        return run

    return wrap


class PooledBench(DiTBench):
    """A model whose prompt is a context and a pooled vector (Flux.1, SD3.5); the NAG negative is both."""

    def conditioning(self, randn: Callable[..., torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
        return {"context": randn(self.batch, tokens, self.spec.context_dim), "y": randn(self.batch, self.spec.pooled_dim)}

    def nag_negative(self, conditioning: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"crossattn": conditioning["context"], "vector": conditioning["y"]}


class FluxBench(PooledBench):
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

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        return flux_nag_forward(self.model, negative, NAG_PARAMS, lambda _options: True)

    def describe(self) -> tuple[str, str]:
        spec = self.spec
        return f"{spec.double_blocks} double + {spec.single_blocks} single blocks", "Flux.1's full model (3072 wide, 19 + 38 blocks)"

    def floor_text(self, floor: dict[str, Any], key: str) -> str:
        return (
            f"Per double block {floor['per_double_block'] / 1e9:,.2f} GFLOP: the NAG text stream's linear layers on its "
            f"{self.spec.negative_tokens} tokens and the second joint attention [NAG text; image] (QKᵀ and AV). Per single block "
            f"{floor['per_single_block'] / 1e9:,.2f} GFLOP: the NAG rows' whole stream (linear1/linear2 on [NAG text; image] and their "
            "attention), since the authors run the NAG rows as a full stream there. Plus txt_in/vector_in on the negative "
            f"({floor['embeddings'] / 1e9:,.2f})"
        )


class SD35Bench(PooledBench):
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

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        return mmdit_nag_forward(self.model, negative, NAG_PARAMS, forge_rows(lambda _options: True))

    def describe(self) -> tuple[str, str]:
        return f"{self.spec.joint_blocks} joint blocks", "SD3.5 Large's full model (2432 wide, 38 joint blocks)"

    def floor_text(self, floor: dict[str, Any], key: str) -> str:
        return (
            f"Per joint block {floor['per_joint_block'] / 1e9:,.2f} GFLOP: the NAG context stream's linear layers on its "
            f"{self.spec.negative_tokens} tokens (qkv, proj, MLP, modulation) and the second joint attention [NAG context; image] "
            f"(QKᵀ and AV); in the last, pre_only, block {floor['last_joint_block'] / 1e9:,.2f} GFLOP (qkv and attention only). "
            f"Plus context_embedder/y_embedder on the negative ({floor['embeddings'] / 1e9:,.2f})"
        )


class ChromaBench(DiTBench):
    """Forge main's Chroma stand-in; (nag) is ``lib_nag.models.flux.nag_forward``, whose NAG rows are their
    text alone in the single-stream blocks (``ChromaModulations.text_free``), and (full-stream) the same with
    that shortcut off, the NAG rows a whole ``[NAG text; image]`` stream there, as Flux's are."""

    variants = CHROMA_VARIANTS
    row_arguments = ("timestep",)
    full_model = CHROMA
    nag_flops = staticmethod(chroma_nag_flops)  # with the shortcut; nag_flops_of gives (full-stream)'s
    pass_flops = staticmethod(chroma_pass_flops)
    targets = SHORTCUT_TARGETS
    spec: ChromaSpec

    def build(self, seed: int) -> nn.Module:
        return build_chroma(self.spec, self.device, self.dtype, seed)

    def call_arguments(self, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"timestep": sigmas}  # Chroma's predictor gives σ

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        return flux_nag_forward(self.model, negative, NAG_PARAMS, lambda _options: True)

    def nag_forwards(self, negative: Callable[[], Any]) -> dict[str, Callable[..., torch.Tensor]]:
        without_shortcut = patched(ChromaModulations, "text_free", False)
        return {"nag": self.nag(negative), "full-stream": without_shortcut(self.nag(negative))}

    def nag_flops_of(self, key: str, spec: ChromaSpec, image_tokens: int, batch: int = 1) -> dict[str, int]:
        return chroma_nag_flops(spec, image_tokens, batch, text_alone=key == "nag")

    def describe(self) -> tuple[str, str]:
        spec = self.spec
        return f"{spec.double_blocks} double + {spec.single_blocks} single blocks", "Chroma's full model (3072 wide, 19 + 38 blocks)"

    def floor_text(self, floor: dict[str, Any], key: str) -> str:
        single = (
            "the NAG rows' text alone (linear1/linear2 on its tokens) and their attention over [NAG text; image]"
            if key == "nag"
            else "the NAG rows' whole stream (linear1/linear2 on [NAG text; image]) and their attention"
        )
        return (
            f"Per double block {floor['per_double_block'] / 1e9:,.2f} GFLOP: the NAG text stream's linear layers on its "
            f"{self.spec.negative_tokens} tokens and the second joint attention [NAG text; image]. Per single block "
            f"{floor['per_single_block'] / 1e9:,.2f} GFLOP: {single}. Chroma's modulations carry no prompt: the NAG rows take their "
            f"positive rows'. Plus txt_in on the negative ({floor['embeddings'] / 1e9:,.2f})"
        )


DIT_BENCHES: dict[type, type[DiTBench]] = {FluxSpec: FluxBench, SD35Spec: SD35Bench, ChromaSpec: ChromaBench}


def dit_targets(stats: dict[str, Any], nag: str, extra: str, floor_fraction: float, limits: dict[str, float]) -> dict[str, Any]:
    """NAG's measured extra cost against ``limits``: 1.2× the analytic floor, and a fraction of the extra
    pass's extra cost (``extra_pass_fraction``) or of the step (``overhead``)."""
    overhead, extra_pass = stats["ratio"][nag] - 1, stats["ratio"][extra] - 1
    floor_bound = limits["floor_factor"] * floor_fraction
    targets = {
        "floor": {
            "value": overhead,
            "limit": floor_bound,
            "pass": overhead <= floor_bound,
            "measured_over_floor": overhead / floor_fraction,
        }
    }
    if "extra_pass_fraction" in limits:
        of_extra_pass, bound = overhead / extra_pass, limits["extra_pass_fraction"]
        targets["extra_pass"] = {"value": of_extra_pass, "limit": bound, "pass": of_extra_pass <= bound}
    if "overhead" in limits:
        targets["overhead"] = {"value": overhead, "limit": limits["overhead"], "pass": overhead <= limits["overhead"]}
    return targets


def floor_counted(bench: DiTBench, key: str, counted: dict[str, int], negative_tokens: int) -> dict[str, Any]:
    """NAG variant ``key``'s analytic floor with what the counter and the timing compare it to."""
    off, extra = bench.off, bench.extra
    floor: dict[str, Any] = bench.floor(key)
    floor["fraction"] = floor["floor_flops"] / counted[off]
    floor[f"counted_extra_{key}"], floor[f"counted_extra_{extra}"] = counted[key] - counted[off], counted[extra] - counted[off]
    floor["analytic_extra_pass"] = bench.extra_pass_flops()
    floor["floor_over_extra_pass"] = floor["floor_flops"] / floor[f"counted_extra_{extra}"]
    floor["full_model_floor_over_extra_pass"] = bench.full_model_floor_over_extra_pass(negative_tokens, key)
    return floor


def run_dit_model(
    bench_class: type[DiTBench],
    spec: Any,
    resolution: int,
    negative_tokens: int,
    repeats: int,
    args: argparse.Namespace,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    started = time.perf_counter()
    bench = bench_class(spec, resolution, args.batch, args.device, DTYPES[args.dtype], args.seed)
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
    off, nag, extra = bench.off, bench.nag_key, bench.extra
    counted, outputs = counted_flops(bench.run, keys, keep_outputs=True)  # the first step of each: warm-up, FLOPs, outputs
    checks = bench.checks(outputs)
    del outputs
    times = time_interleaved(bench.timed, keys, repeats, args.warmup)
    stats = timing_stats(times, base=off)
    profile = bench.profile(stats["medians"]) if args.profile else []
    measure_s = time.perf_counter() - started

    floors = {key: floor_counted(bench, key, counted, negative_tokens) for key in bench.nag_keys}
    floor = floors[nag]
    targets = dit_targets(stats, nag, extra, floor["fraction"], bench.targets)
    for line in (*dit_report(bench, times, stats, counted, floors, checks, targets), *profile):
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
        "nag_extra_over_extra_pass": (stats["ratio"][nag] - 1) / (stats["ratio"][extra] - 1),
        "floor": floor,
        "floors": floors,
        "noise": {f"{off}_iqr_over_median": spread(times[off]), "rounds": stats["rounds"], "rounds_used": stats["used"]},
        "checks": checks,
        "targets": targets,
        "profile": profile,
    }


TARGET_TEXT = {
    "floor": "({nag})/({off}) − 1 = {value:+.1%} ≤ {factor}× floor = {limit:.1%}",
    "extra_pass": "(({nag})−({off})) / (({extra})−({off})) = {value:.3f} ≤ {limit}",
    "overhead": "({nag})/({off}) − 1 = {value:+.1%} ≤ {limit:.0%}",
}


def dit_report(
    bench: DiTBench,
    times: dict[str, list[float]],
    stats: dict[str, Any],
    counted: dict[str, int],
    floors: dict[str, dict[str, Any]],
    checks: dict[str, Any],
    targets: dict[str, Any],
) -> list[str]:
    spec, ratio, medians, verdict = bench.spec, stats["ratio"], stats["medians"], {True: "PASS", False: "MISS"}
    off, nag, extra = bench.off, bench.nag_key, bench.extra
    floor = floors[nag]
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
    more_variants = [
        f"{bench.variants[key]}: analytic floor {other['floor_flops'] / 1e9:,.2f} GFLOP = {other['fraction']:.1%} of ({off}). "
        f"{bench.floor_text(other, key)}. Counted ({key})−({off}) {other[f'counted_extra_{key}'] / 1e9:,.2f} GFLOP (analytic matmuls "
        f"{other['matmul_flops'] / 1e9:,.2f}); floor / extra pass = {other['floor_over_extra_pass']:.3f} here, "
        f"{other['full_model_floor_over_extra_pass']:.3f} for {full_model} at 1024². Measured ({key})/({off}) − 1 = "
        f"{ratio[key] - 1:+.1%} (measured/floor {(ratio[key] - 1) / other['fraction']:.2f}), "
        f"(({key})−({off})) / (({extra})−({off})) = {(ratio[key] - 1) / (ratio[extra] - 1):.3f}; NAG moved its output by "
        f"{checks[f'{key}_changed_by_nag']:.3g}."
        for key, other in floors.items()
        if key != nag
    ]
    names = {"nag": nag, "off": off, "extra": extra, "factor": bench.targets["floor_factor"]}
    target_lines = [
        f"- {TARGET_TEXT[name].format(**names, value=target['value'], limit=target['limit'])}: {verdict[target['pass']]}"
        + (f" (measured/floor {target['measured_over_floor']:.2f})" if name == "floor" else "")
        + (f" (by FLOPs at best {floor['floor_over_extra_pass']:.3f})" if name == "extra_pass" else "")
        for name, target in targets.items()
    ]
    return [
        *lines,
        "",
        f"Analytic floor of NAG's extra FLOPs: {floor['floor_flops'] / 1e9:,.2f} GFLOP = {floor['fraction']:.1%} of ({off})'s counted "
        f"{counted[off] / 1e9:,.1f} GFLOP. {bench.floor_text(floor, nag)} and {floor['elementwise_flops'] / 1e9:,.2f} GFLOP elementwise "
        f"(NAG combine {NAG_FLOPS_PER_Z}/element, softmax {SOFTMAX_FLOPS_PER_SCORE}/score; norms, GELU and RoPE not counted).",
        f"Counted with FlopCounterMode (mm/addmm/bmm, SDPA): ({nag})−({off}) {floor[f'counted_extra_{nag}'] / 1e9:,.2f} GFLOP (analytic "
        f"matmuls {floor['matmul_flops'] / 1e9:,.2f}); ({extra})−({off}) {floor[f'counted_extra_{extra}'] / 1e9:,.2f} GFLOP (analytic "
        f"{floor['analytic_extra_pass'] / 1e9:,.2f}). Floor / extra pass = {floor['floor_over_extra_pass']:.3f} here, "
        f"{floor['full_model_floor_over_extra_pass']:.3f} for {full_model} at 1024²: the least ({nag}) can cost relative to ({extra}) "
        "by FLOPs, with the authors' formulation.",
        *more_variants,
        f"Checks: NAG moved ({nag})'s output by {checks[f'{nag}_changed_by_nag']:.3g} (max |Δ| / max |({off})|); ({extra})'s cond rows "
        f"vs ({off}): {checks[f'{extra}_cond_rows_vs_{off}']:.2e}; all finite: {checks['finite']}.",
        "",
        f"Targets ({spec.name}, {bench.resolution}², {blocks}, hidden {spec.hidden_size}):",
        *target_lines,
    ]
