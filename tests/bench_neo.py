"""Forge Neo's families in the benchmark of tests/bench.py, each on its stand-in (tests/forge/backend/nn) at
its real width, with NAG off, NAG as this project does it and an extra full pass (what CFG costs), at CFG 1
and 1024²-shaped tokens (the framework: bench_dit.py):

- ``qwen``: Qwen-Image, 60 dual-stream blocks; NAG runs a NAG text stream beside the batch (``models.qwen``).
- ``zimage`` and ``lumina2``: NextDiT (Z-Image; Lumina 2 with grouped-query attention); the NAG rows are their
  caption alone, refined by the context refiner (``models.nextdit``).
- ``flux2``: Flux.2 Klein 4B (Neo's Flux port with global modulations); the NAG rows are their text alone
  in the single blocks (``models.flux2``).
- ``ernie``: ERNIE-Image, image-first single-stream layers (``models.ernie``).
- ``krea``: Krea 2, single-stream blocks with a text-fusion transformer (``models.krea``).
- ``wan``: Wan 2.1/2.2 text-to-video; NAG guides its text cross-attention through ``WanPass``'s hooks
  (``models.wan``), with a warm K⁻/V⁻ cache.

Each has its full-size spec (the CUDA default, and the "full model at 1024²" of the floor ratio) and a
reduced depth at the real width (the CPU default), and an analytic floor of NAG's extra FLOPs that the
tests check against FlopCounterMode on tiny specs (counted = analytic for the matmuls).
"""

from __future__ import annotations

import math
import statistics
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, replace
from functools import partial
from itertools import pairwise
from types import SimpleNamespace
from typing import Any

import bench_common  # noqa: F401  (imported first: it puts the stand-ins on the path)
import torch
from backend.nn.ernie import ErnieImageModel
from backend.nn.flux_neo import IntegratedFluxTransformer2DModel as NeoFluxModel
from backend.nn.krea import SingleStreamDiT
from backend.nn.lumina import NextDiT
from backend.nn.qwen import QwenImageTransformer2DModel
from backend.nn.wan import WanModel
from backend.patcher.unet import UnetPatcher
from bench_common import NAG_FLOPS_PER_Z, NAG_PARAMS, SOFTMAX_FLOPS_PER_SCORE, elapsed, materialized
from bench_dit import SHORTCUT_TARGETS, DiTBench, attention_flops, elementwise_flops, floor_of, patched
from modules import prompt_parser, script_callbacks, shared
from torch import nn

from lib_nag.guidance import nag_combine
from lib_nag.models import ernie, krea, nextdit, qwen
from lib_nag.models.flux import nag_forward as flux_nag_forward
from lib_nag.models.flux2 import flux2_modulations
from lib_nag.models.wan import WanPass, cross_attention_layers
from lib_nag.models.wan import layer as wan_layer
from lib_nag.webui.forge_patcher import forge_rows
from lib_nag.webui.report import PassReport

VARIANTS = {
    "off": "(off) NAG off, the model's own forward",
    "nag": "(nag) NAG on (this project)",
    "extra": "(extra) extra full pass (2B rows, as CFG)",
}
WAN_VARIANTS = VARIANTS | {
    "off": "(off) NAG off (the pass's hooks in place, outside its window)",
    "nag": "(nag) NAG on (this project: WanPass, K⁻/V⁻ cache warm)",
}
WAN_TARGETS = {"overhead": 0.05, "floor_factor": 1.2}  # issue 16: NAG ≤ +5 % per step, within 1.2× its floor


def every_row(_options: dict) -> bool:
    """The step window of these benchmarks: every call is inside it."""
    return True


@dataclass(frozen=True)
class NeoSpec:
    """What every family's spec here has: its name, width and attention heads, then its own sizes, then by
    keyword its latent (``latent_channels``, ``latent_scale``× smaller than the image, cut in ``patch``×``patch``
    patches, padded) and the token counts of the prompt and of the NAG negative."""

    name: str
    hidden_size: int
    num_heads: int
    _: KW_ONLY
    latent_channels: int = 16
    latent_scale: int = 8
    patch: int = 2
    prompt_tokens: int = 128
    negative_tokens: int = 128

    def side(self, resolution: int) -> int:
        return resolution // self.latent_scale

    def image_tokens(self, resolution: int) -> int:
        return math.ceil(self.side(resolution) / self.patch) ** 2

    def latent(self, resolution: int) -> tuple[int, ...]:
        return self.latent_channels, self.side(resolution), self.side(resolution)

    @property
    def patch_features(self) -> int:
        return self.latent_channels * self.patch * self.patch


def linear_flops(tokens: int, *widths: int) -> int:
    """Linear layers in a row (``widths[0]`` → ``widths[1]`` → …) on ``tokens`` tokens."""
    return sum(2 * tokens * a * b for a, b in pairwise(widths))


class NeoBench(DiTBench):
    """A Neo family: the model built by ``architecture`` on the meta device, then given random weights; its
    call's timestep (``row_arguments[0]``) σ·``timestep_scale``, as Neo's predictor gives it; its heading and
    floor from templates: ``blocks_text`` formatted with the spec (``spec``), ``full_text`` with the full model
    (``full``), ``floor_template`` with the spec and the floor's parts in GFLOP."""

    variants = VARIANTS
    row_arguments = ("timesteps",)
    targets = SHORTCUT_TARGETS
    timestep_scale = 1
    blocks_text: str
    full_text: str
    floor_template: str

    @abstractmethod
    def architecture(self) -> nn.Module:
        """The model with the spec's sizes (built on the meta device)."""

    def build(self, seed: int) -> nn.Module:
        with torch.device("meta"):
            model = self.architecture()
        return materialized(model, self.device, self.dtype, seed)

    def call_arguments(self, sigmas: torch.Tensor) -> dict[str, torch.Tensor]:
        return {self.row_arguments[0]: sigmas * self.timestep_scale}

    def describe(self) -> tuple[str, str]:
        return self.blocks_text.format(spec=self.spec), self.full_text.format(full=self.full_model)

    def floor_text(self, floor: dict[str, Any], key: str) -> str:
        return self.floor_template.format(spec=self.spec, **{name: value / 1e9 for name, value in floor.items()})


def text_stream_floor(
    spec: Any,
    image_tokens: int,
    batch: int,
    blocks: int,
    stream: Callable[[int], int],
    before_blocks: int,
    names: tuple[str, str] = ("per_block", "embeddings"),
    text_tokens: int | None = None,
) -> dict[str, int]:
    """The analytic floor of NAG's extra FLOPs over (off) for ``batch`` positive rows (2 FLOPs per
    multiply-add) in a family whose NAG rows are a text stream beside the batch (their modulation their
    positive rows': the time alone): in each of ``blocks`` blocks the NAG text's linear layers
    (``stream(tokens)``) and its attention over [NAG text; image] (with the positive row's image q/k/v),
    and ``before_blocks`` once per row (the negative's text embedding). The NAG text has the negative's
    tokens (or ``text_tokens``, padded). The elementwise part as for Flux: the NAG combine on the image
    tokens of every block and the softmax of the NAG rows' attention."""
    text = spec.negative_tokens if text_tokens is None else text_tokens
    per_block = stream(text) + attention_flops(spec, text + image_tokens)
    matmul = batch * (before_blocks + blocks * per_block)
    per_block_name, before_name = names
    parts = {per_block_name: per_block, before_name: before_blocks}
    return floor_of(parts, batch, matmul, elementwise_flops(spec, image_tokens, blocks, batch))


# --- Qwen-Image --------------------------------------------------------------------------------


@dataclass(frozen=True)
class QwenSpec(NeoSpec):
    """Widths and depth of Neo's ``QwenImageTransformer2DModel`` (Qwen-Image: 60 dual-stream blocks, 3072
    wide = 24 heads of 128, GELU MLPs of 4×, Qwen2.5-VL text of 3584, 16-channel latents in 2×2 patches)."""

    blocks: int
    context_dim: int = 3584
    axes_dim: tuple[int, ...] = (16, 56, 56)

    def latent(self, resolution: int) -> tuple[int, ...]:
        return self.latent_channels, 1, self.side(resolution), self.side(resolution)  # Neo's 5-D latent, one frame


QWEN = QwenSpec("Qwen-Image", 3072, 24, 60)
QWEN_CPU = replace(QWEN, blocks=1)
TINY_QWEN = QwenSpec("tiny Qwen-Image", 64, 4, 2, context_dim=24, axes_dim=(4, 6, 6), latent_channels=4, prompt_tokens=7, negative_tokens=5)


def _qwen_stream(spec: QwenSpec, tokens: int) -> int:
    """One stream of a block on ``tokens``: its q, k, v, out-projection and MLP (d → 4d → d)."""
    d = spec.hidden_size
    return linear_flops(tokens, d, 3 * d) + linear_flops(tokens, d, d) + linear_flops(tokens, d, 4 * d, d)


def qwen_nag_flops(spec: QwenSpec, image_tokens: int, batch: int = 1) -> dict[str, int]:
    """NAG's extra FLOPs: per block the NAG text stream (q, k, v, ``to_add_out``, MLP) and its attention;
    ``txt_in`` on the negative."""
    embeddings = linear_flops(spec.negative_tokens, spec.context_dim, spec.hidden_size)
    return text_stream_floor(spec, image_tokens, batch, spec.blocks, partial(_qwen_stream, spec), embeddings)


def qwen_pass_flops(spec: QwenSpec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows."""
    d, text = spec.hidden_size, max(spec.prompt_tokens, spec.negative_tokens)
    joint = text + image_tokens
    per_block = _qwen_stream(spec, joint) + 2 * linear_flops(1, d, 6 * d) + attention_flops(spec, joint)  # + img_mod, txt_mod
    embeddings = linear_flops(image_tokens, spec.patch_features, d) + linear_flops(text, spec.context_dim, d) + linear_flops(1, 256, d, d)
    final = linear_flops(1, d, 2 * d) + linear_flops(image_tokens, d, spec.patch_features)
    return batch * (embeddings + spec.blocks * per_block + final)


class QwenBench(NeoBench):
    """Neo's Qwen-Image stand-in; (nag) is ``lib_nag.models.qwen.nag_forward`` with Forge's rows."""

    full_model = QWEN
    nag_flops = staticmethod(qwen_nag_flops)
    pass_flops = staticmethod(qwen_pass_flops)
    blocks_text = "{spec.blocks} dual-stream block(s)"
    full_text = "{full.name}'s full model ({full.hidden_size} wide, {full.blocks} blocks)"
    floor_template = (
        "Per block {per_block:,.2f} GFLOP: the NAG text stream's q, k, v, out-projection and MLP on its {spec.negative_tokens} tokens "
        "(its modulation is its positive row's: the time alone) and its attention over [NAG text; image]. Plus txt_in on the "
        "negative ({embeddings:,.2f})"
    )

    def architecture(self) -> nn.Module:
        spec = self.spec
        return QwenImageTransformer2DModel(
            patch_size=spec.patch, in_channels=spec.patch_features, out_channels=spec.latent_channels, num_layers=spec.blocks,
            attention_head_dim=spec.hidden_size // spec.num_heads, num_attention_heads=spec.num_heads, joint_attention_dim=spec.context_dim,
            axes_dims_rope=spec.axes_dim,
        )  # fmt: skip

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        return qwen.nag_forward(self.model, negative, NAG_PARAMS, forge_rows(every_row))


# --- NextDiT: Z-Image, Lumina 2 ----------------------------------------------------------------


@dataclass(frozen=True)
class NextDiTSpec(NeoSpec):
    """Widths and depths of Neo's ``NextDiT``: ``heads`` query and ``kv_heads`` key/value heads, a SwiGLU
    feed-forward of ``ffn_multiplier``·width (rounded up to ``multiple_of``), ``layers`` main layers over
    [caption; image], ``context_refiners`` on the caption and ``noise_refiners`` on the image before them;
    Z-Image: its adaLN on a 256-wide time embedding, captions and images padded to ``pad_tokens_multiple``."""

    kv_heads: int
    layers: int
    ffn_multiplier: float
    context_dim: int
    axes_dim: tuple[int, ...]
    z_image: bool = False
    time_scale: float = 1.0
    pad_tokens_multiple: int | None = None
    rope_theta: float = 10000.0
    context_refiners: int = 2
    noise_refiners: int = 2
    multiple_of: int = 256

    @property
    def ffn_hidden(self) -> int:
        return self.multiple_of * math.ceil(int(self.ffn_multiplier * self.hidden_size) / self.multiple_of)

    @property
    def adaln_width(self) -> int:
        return min(self.hidden_size, 256 if self.z_image else 1024)

    def padded(self, tokens: int) -> int:
        return tokens if self.pad_tokens_multiple is None else tokens + (-tokens) % self.pad_tokens_multiple


ZIMAGE = NextDiTSpec("Z-Image", 3840, 30, 30, 30, 8 / 3, 2560, (32, 48, 48), True, 1000.0, 32, 256.0)
LUMINA2 = NextDiTSpec("Lumina 2", 2304, 24, 8, 26, 4.0, 2304, (32, 32, 32))
REDUCED_NEXTDIT = {"layers": 1, "noise_refiners": 1}  # the two context refiners stay: NAG runs them on its caption
TINY_ZIMAGE = NextDiTSpec(
    "tiny Z-Image", 256, 4, 4, 2, 8 / 3, 32, (16, 24, 24), True, 1000.0, 4, 256.0, multiple_of=32, latent_channels=4, prompt_tokens=7,
    negative_tokens=5,
)  # fmt: skip
TINY_LUMINA2 = NextDiTSpec(
    "tiny Lumina 2", 96, 6, 2, 2, 4.0, 24, (4, 6, 6), noise_refiners=1, multiple_of=32, latent_channels=4, prompt_tokens=7,
    negative_tokens=5,
)  # fmt: skip


def _nextdit_linear(spec: NextDiTSpec, tokens: int) -> int:
    """One layer's qkv (grouped), out-projection and SwiGLU feed-forward on ``tokens``."""
    d, head = spec.hidden_size, spec.hidden_size // spec.num_heads
    projections = linear_flops(tokens, d, (spec.num_heads + 2 * spec.kv_heads) * head) + linear_flops(tokens, d, d)
    return projections + 3 * linear_flops(tokens, d, spec.ffn_hidden)


def _nextdit_layer(spec: NextDiTSpec, tokens: int) -> int:
    """One layer (its attention too) on ``tokens``."""
    return _nextdit_linear(spec, tokens) + attention_flops(spec, tokens)


def nextdit_nag_flops(spec: NextDiTSpec, image_tokens: int, batch: int = 1) -> dict[str, int]:
    """NAG's extra FLOPs: ``cap_embedder`` and the context refiners on the NAG caption (padded as the model
    pads one), and per main layer the NAG caption's qkv, out-projection and feed-forward and its attention."""
    text = spec.padded(spec.negative_tokens)
    caption = linear_flops(spec.negative_tokens, spec.context_dim, spec.hidden_size) + spec.context_refiners * _nextdit_layer(spec, text)
    stream = partial(_nextdit_linear, spec)
    return text_stream_floor(spec, spec.padded(image_tokens), batch, spec.layers, stream, caption, ("per_layer", "caption"), text)


def nextdit_pass_flops(spec: NextDiTSpec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows."""
    d, prompt = spec.hidden_size, max(spec.prompt_tokens, spec.negative_tokens)
    text, image, adaln = spec.padded(prompt), spec.padded(image_tokens), linear_flops(1, spec.adaln_width, 4 * spec.hidden_size)
    time = linear_flops(1, 256, min(d, 1024), 256 if spec.z_image else min(d, 1024))
    embeddings = time + linear_flops(prompt, spec.context_dim, d) + linear_flops(image_tokens, spec.patch_features, d)
    refiners = spec.context_refiners * _nextdit_layer(spec, text) + spec.noise_refiners * (_nextdit_layer(spec, image) + adaln)
    final = linear_flops(1, spec.adaln_width, d) + linear_flops(text + image, d, spec.patch_features)
    return batch * (embeddings + refiners + spec.layers * (_nextdit_layer(spec, text + image) + adaln) + final)


class NextDiTBench(NeoBench):
    """Neo's NextDiT stand-in as Z-Image or Lumina 2; (nag) is ``lib_nag.models.nextdit.nag_forward`` with Forge's rows."""

    nag_flops = staticmethod(nextdit_nag_flops)
    pass_flops = staticmethod(nextdit_pass_flops)
    blocks_text = (
        "{spec.layers} layer(s) + {spec.context_refiners} context + {spec.noise_refiners} noise refiner(s), {spec.kv_heads} key/value "
        "heads, FFN {spec.ffn_hidden}"
    )
    full_text = "{full.name}'s full model ({full.hidden_size} wide, {full.layers} + 2 + 2 layers)"
    floor_template = (
        "Per layer {per_layer:,.2f} GFLOP: the NAG caption's qkv, out-projection and feed-forward on its {spec.negative_tokens} tokens "
        "(padded as the model pads a caption; its adaLN is its positive row's: the time alone) and its attention over [NAG caption; "
        "image]. Plus cap_embedder and the context refiners on the NAG caption ({caption:,.2f})"
    )

    @property
    def full_model(self) -> NextDiTSpec:
        return ZIMAGE if self.spec.z_image else LUMINA2

    def architecture(self) -> nn.Module:
        spec = self.spec
        model = NextDiT(
            patch_size=spec.patch, in_channels=spec.latent_channels, dim=spec.hidden_size, n_layers=spec.layers,
            n_refiner_layers=max(spec.context_refiners, spec.noise_refiners), n_heads=spec.num_heads, n_kv_heads=spec.kv_heads,
            multiple_of=spec.multiple_of, ffn_dim_multiplier=spec.ffn_multiplier, qk_norm=True, cap_feat_dim=spec.context_dim,
            axes_dims=list(spec.axes_dim), rope_theta=spec.rope_theta, z_image_modulation=spec.z_image, time_scale=spec.time_scale,
            pad_tokens_multiple=spec.pad_tokens_multiple,
        )  # fmt: skip
        del model.context_refiner[spec.context_refiners :], model.noise_refiner[spec.noise_refiners :]
        return model

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        return nextdit.nag_forward(self.model, negative, NAG_PARAMS, forge_rows(every_row))


# --- Flux.2 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Flux2Spec(NeoSpec):
    """Widths and depths of Neo's Flux port as Flux.2 Klein builds it (4B: 5 double + 20 single blocks, 3072
    wide = 24 heads of 128, gated SiLU MLPs of 9216, Qwen3 text of 7680, global modulations of the time
    alone, no pooled vector or guidance; 128-channel latents 16× smaller, in 1×1 patches)."""

    double_blocks: int
    single_blocks: int
    mlp_hidden: int
    context_dim: int
    axes_dim: tuple[int, ...] = (32, 32, 32, 32)
    _: KW_ONLY
    latent_channels: int = 128
    latent_scale: int = 16
    patch: int = 1
    prompt_tokens: int = 512
    negative_tokens: int = 512


KLEIN_4B = Flux2Spec("Flux.2 Klein 4B", 3072, 24, 5, 20, 9216, 7680)
KLEIN_9B = Flux2Spec("Flux.2 Klein 9B", 4096, 32, 8, 24, 12288, 12288)
KLEIN_CPU = replace(KLEIN_4B, double_blocks=1, single_blocks=1)
TINY_FLUX2 = Flux2Spec(
    "tiny Flux.2", 64, 4, 1, 2, 192, 24, (4, 4, 4, 4), latent_channels=8, latent_scale=8, prompt_tokens=7, negative_tokens=5
)


def _flux2_stream(spec: Flux2Spec, tokens: int) -> int:
    """qkv, out-projection and gated MLP on ``tokens`` (a double block's stream = a single block's linear1 + linear2)."""
    d, mlp = spec.hidden_size, spec.mlp_hidden
    return linear_flops(tokens, d, 3 * d + 2 * mlp) + linear_flops(tokens, d + mlp, d)


def flux2_nag_flops(spec: Flux2Spec, image_tokens: int, batch: int = 1) -> dict[str, int]:
    """NAG's extra FLOPs: per block, double or single (there the NAG rows are their text alone), the NAG
    text's linear layers and its attention; ``txt_in`` on the negative."""
    embeddings = linear_flops(spec.negative_tokens, spec.context_dim, spec.hidden_size)
    blocks = spec.double_blocks + spec.single_blocks
    return text_stream_floor(spec, image_tokens, batch, blocks, partial(_flux2_stream, spec), embeddings)


def flux2_pass_flops(spec: Flux2Spec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows."""
    d, text = spec.hidden_size, max(spec.prompt_tokens, spec.negative_tokens)
    joint = text + image_tokens
    modulations = linear_flops(1, d, (6 + 6 + 3) * d)  # the global modulations: double image, double text, single
    embeddings = linear_flops(image_tokens, spec.patch_features, d) + linear_flops(1, 256, d, d) + linear_flops(text, spec.context_dim, d)
    per_block = _flux2_stream(spec, joint) + attention_flops(spec, joint)
    final = linear_flops(1, d, 2 * d) + linear_flops(image_tokens, d, spec.patch_features)
    return batch * (embeddings + modulations + (spec.double_blocks + spec.single_blocks) * per_block + final)


class Flux2Bench(NeoBench):
    """Neo's Flux stand-in as Flux.2 Klein; (nag) is ``lib_nag.models.flux.nag_forward`` with Flux.2's
    modulations, in place of Neo's ``forward_orig`` for the call."""

    row_arguments = ("timestep",)
    timestep_scale = 1000  # 06d6af9a's forward divides by 1000
    full_model = KLEIN_4B
    nag_flops = staticmethod(flux2_nag_flops)
    pass_flops = staticmethod(flux2_pass_flops)
    blocks_text = "{spec.double_blocks} double + {spec.single_blocks} single block(s), gated MLP {spec.mlp_hidden}"
    full_text = "{full.name}'s full model ({full.hidden_size} wide, {full.double_blocks} + {full.single_blocks} blocks)"
    floor_template = (
        "Per block {per_block:,.2f} GFLOP, double or single: the NAG text's linear layers on its {spec.negative_tokens} tokens (in the "
        "single blocks the NAG rows are their text alone: their modulation is their positive row's) and its attention over [NAG text; "
        "image]. Plus txt_in on the negative ({embeddings:,.2f})"
    )

    def architecture(self) -> nn.Module:
        spec = self.spec
        return NeoFluxModel(
            spec.latent_channels, spec.latent_channels, None, spec.context_dim, spec.hidden_size, spec.mlp_hidden / spec.hidden_size,
            spec.num_heads, spec.double_blocks, spec.single_blocks, list(spec.axes_dim), 2000, spec.patch, qkv_bias=False,
            guidance_embed=False, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False, default_ref_method="index",
            ref_index_scale=10.0,
        )  # fmt: skip

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        forward_orig = flux_nag_forward(self.model, negative, NAG_PARAMS, every_row, modulations_of=flux2_modulations)
        return patched(self.model, "forward_orig", forward_orig)(self.model)


# --- ERNIE-Image ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ErnieSpec(NeoSpec):
    """Widths and depth of Neo's ``ErnieImageModel`` (36 single-stream layers over [image; text], 4096 wide =
    32 heads of 128, gated feed-forward of 12288, text of 3072, 128-channel latents 16× smaller in 1×1 patches)."""

    layers: int
    ffn_hidden: int
    context_dim: int = 3072
    axes_dim: tuple[int, ...] = (32, 48, 48)
    _: KW_ONLY
    latent_channels: int = 128
    latent_scale: int = 16
    patch: int = 1


ERNIE = ErnieSpec("ERNIE-Image", 4096, 32, 36, 12288)
ERNIE_CPU = replace(ERNIE, layers=1)
TINY_ERNIE = ErnieSpec(
    "tiny ERNIE-Image", 64, 4, 2, 96, 24, (4, 6, 6), latent_channels=8, latent_scale=8, patch=2, prompt_tokens=7, negative_tokens=5
)


def _ernie_layer(spec: ErnieSpec, tokens: int) -> int:
    """A layer's q, k, v, out-projection and gated feed-forward on ``tokens``."""
    d = spec.hidden_size
    return linear_flops(tokens, d, 4 * d) + 3 * linear_flops(tokens, d, spec.ffn_hidden)


def ernie_nag_flops(spec: ErnieSpec, image_tokens: int, batch: int = 1) -> dict[str, int]:
    """NAG's extra FLOPs: per layer the NAG text's q, k, v, out-projection and feed-forward and its attention
    over [image; NAG text]; ``text_proj`` on the negative."""
    embeddings = linear_flops(spec.negative_tokens, spec.context_dim, spec.hidden_size)
    return text_stream_floor(spec, image_tokens, batch, spec.layers, partial(_ernie_layer, spec), embeddings, ("per_layer", "embeddings"))


def ernie_pass_flops(spec: ErnieSpec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows."""
    d, text = spec.hidden_size, max(spec.prompt_tokens, spec.negative_tokens)
    joint = text + image_tokens
    time = linear_flops(1, d, d, d) + linear_flops(1, d, 6 * d)  # time_embedding, adaLN_modulation
    embeddings = linear_flops(image_tokens, spec.patch_features, d) + linear_flops(text, spec.context_dim, d) + time
    final = linear_flops(1, d, 2 * d) + linear_flops(joint, d, spec.patch_features)  # final_linear runs on every token
    return batch * (embeddings + spec.layers * (_ernie_layer(spec, joint) + attention_flops(spec, joint)) + final)


class ErnieBench(NeoBench):
    """Neo's ERNIE-Image stand-in; (nag) is ``lib_nag.models.ernie.nag_forward`` with Forge's rows."""

    timestep_scale = 1000
    full_model = ERNIE
    nag_flops = staticmethod(ernie_nag_flops)
    pass_flops = staticmethod(ernie_pass_flops)
    blocks_text = "{spec.layers} layer(s), FFN {spec.ffn_hidden}"
    full_text = "{full.name}'s full model ({full.hidden_size} wide, {full.layers} layers)"
    floor_template = (
        "Per layer {per_layer:,.2f} GFLOP: the NAG text's q, k, v, out-projection and feed-forward on its {spec.negative_tokens} tokens "
        "(its modulation is its positive row's: the time alone) and its attention over [image; NAG text]. Plus text_proj on the "
        "negative ({embeddings:,.2f})"
    )

    def architecture(self) -> nn.Module:
        spec = self.spec
        return ErnieImageModel(
            spec.hidden_size, spec.num_heads, spec.layers, spec.ffn_hidden, spec.latent_channels, spec.latent_channels, spec.patch,
            spec.context_dim, rope_axes_dim=spec.axes_dim,
        )  # fmt: skip

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        return ernie.nag_forward(self.model, negative, NAG_PARAMS, forge_rows(every_row))


# --- Krea 2 -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class KreaSpec(NeoSpec):
    """Widths and depths of Neo's ``SingleStreamDiT`` (Krea 2: 28 blocks, 6144 wide, 48 query and 12
    key/value heads of 128, SwiGLU of ``multiplier``·⅔·width rounded up to 128; the text encoder's 12 layers
    of 2560 fused by a 4-block text transformer of 20 heads; 16-channel latents in 2×2 patches)."""

    kv_heads: int
    layers: int
    multiplier: int = 4
    text_width: int = 2560
    text_layers: int = 12
    text_heads: int = 20
    text_kv_heads: int = 20

    @property
    def context_dim(self) -> int:
        return self.text_layers * self.text_width

    def swiglu_hidden(self, width: int) -> int:
        return 128 * math.ceil(int(2 * width / 3) * self.multiplier / 128)

    @property
    def mlp_hidden(self) -> int:
        return self.swiglu_hidden(self.hidden_size)


KREA = KreaSpec("Krea 2", 6144, 48, 12, 28)
KREA_CPU = replace(KREA, layers=1)
TINY_KREA = KreaSpec("tiny Krea 2", 64, 4, 2, 2, 2, 24, 3, 2, 2, latent_channels=4, prompt_tokens=7, negative_tokens=5)


def _krea_block(width: int, heads: int, kv_heads: int, hidden: int, tokens: int) -> int:
    """A block's q, k, v (grouped), output gate, out-projection and SwiGLU on ``tokens``, without its attention."""
    kv = kv_heads * width // heads
    inputs = linear_flops(tokens, width, 2 * width + 2 * kv)  # wq and the gate (width each), wk and wv (kv each)
    return inputs + linear_flops(tokens, width, width) + 3 * linear_flops(tokens, width, hidden)


def krea_text_flops(spec: KreaSpec, tokens: int) -> int:
    """``txtfusion`` (two blocks across each token's encoder layers, the projector, two refiner blocks over the
    tokens) and ``txtmlp`` on a prompt of ``tokens`` tokens."""
    width, layers = spec.text_width, spec.text_layers
    block = _krea_block(width, spec.text_heads, spec.text_kv_heads, spec.swiglu_hidden(width), tokens)
    across_layers = 2 * (layers * block + tokens * 4 * layers * layers * width)
    refiner = 2 * (block + 4 * tokens * tokens * width)
    return (
        across_layers + linear_flops(tokens * width, layers, 1) + refiner + linear_flops(tokens, width, spec.hidden_size, spec.hidden_size)
    )


def _krea_main(spec: KreaSpec, tokens: int) -> int:
    return _krea_block(spec.hidden_size, spec.num_heads, spec.kv_heads, spec.mlp_hidden, tokens)


def krea_nag_flops(spec: KreaSpec, image_tokens: int, batch: int = 1) -> dict[str, int]:
    """NAG's extra FLOPs: the text fusion on the negative, and per block the NAG text's q, k, v, output gate,
    out-projection and SwiGLU and its attention."""
    text_fusion = krea_text_flops(spec, spec.negative_tokens)
    return text_stream_floor(spec, image_tokens, batch, spec.layers, partial(_krea_main, spec), text_fusion, ("per_block", "text_fusion"))


def krea_pass_flops(spec: KreaSpec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows."""
    d, text = spec.hidden_size, max(spec.prompt_tokens, spec.negative_tokens)
    joint = text + image_tokens
    time = linear_flops(1, 256, d, d) + linear_flops(1, d, 6 * d)  # tmlp, tproj
    embeddings = time + linear_flops(image_tokens, spec.patch_features, d) + krea_text_flops(spec, text)
    final = linear_flops(joint, d, spec.patch_features)  # the last layer runs on every token
    return batch * (embeddings + spec.layers * (_krea_main(spec, joint) + attention_flops(spec, joint)) + final)


class KreaBench(NeoBench):
    """Neo's Krea 2 stand-in; (nag) is ``lib_nag.models.krea.nag_forward`` with Forge's rows."""

    full_model = KREA
    nag_flops = staticmethod(krea_nag_flops)
    pass_flops = staticmethod(krea_pass_flops)
    blocks_text = "{spec.layers} block(s), {spec.kv_heads} key/value heads, SwiGLU {spec.mlp_hidden}"
    full_text = "{full.name}'s full model ({full.hidden_size} wide, {full.layers} blocks)"
    floor_template = (
        "Per block {per_block:,.2f} GFLOP: the NAG text's q, k, v, output gate, out-projection and SwiGLU on its {spec.negative_tokens} "
        "tokens (its modulation is its positive row's: the time alone) and its attention over [NAG text; image]. Plus the text fusion "
        "(txtfusion, txtmlp) of the negative ({text_fusion:,.2f})"
    )

    def architecture(self) -> nn.Module:
        spec = self.spec
        return SingleStreamDiT(
            features=spec.hidden_size, txtdim=spec.text_width, heads=spec.num_heads, kvheads=spec.kv_heads, multiplier=spec.multiplier,
            layers=spec.layers, patch=spec.patch, channels=spec.latent_channels, txtlayers=spec.text_layers, txtheads=spec.text_heads,
            txtkvheads=spec.text_kv_heads,
        )  # fmt: skip

    def conditioning(self, randn: Callable[..., torch.Tensor], tokens: int) -> dict[str, torch.Tensor]:
        return {"context": randn(self.batch, 1, tokens, self.spec.context_dim)}  # Neo's Qwen3-VL layers, one prompt per row

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        return krea.nag_forward(self.model, negative, NAG_PARAMS, forge_rows(every_row))


# --- Wan ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WanSpec(NeoSpec):
    """Widths and depth of Neo's ``WanModel`` as text-to-video (1.3B: 30 blocks, 1536 wide = 12 heads of 128,
    FFN 8960; 14B: 40 blocks, 5120 wide = 40 heads, FFN 13824; umT5 text of 4096 in 512 tokens), on
    ``frames`` latent frames of 16 channels, 8× smaller than the image, in 1×2×2 patches."""

    blocks: int
    ffn_hidden: int
    context_dim: int = 4096
    frequency_dim: int = 256
    frames: int = 1
    _: KW_ONLY
    prompt_tokens: int = 512
    negative_tokens: int = 512

    def image_tokens(self, resolution: int) -> int:
        return self.frames * super().image_tokens(resolution)

    def latent(self, resolution: int) -> tuple[int, ...]:
        return self.latent_channels, self.frames, self.side(resolution), self.side(resolution)


WAN_1_3B = WanSpec("Wan 1.3B", 1536, 12, 30, 8960)
WAN_14B = WanSpec("Wan 14B", 5120, 40, 40, 13824)
WAN_CPU = replace(WAN_1_3B, blocks=2)
TINY_WAN = WanSpec("tiny Wan", 32, 2, 2, 64, 24, 16, 2, latent_channels=4, prompt_tokens=7, negative_tokens=5)


def wan_nag_flops(spec: WanSpec, image_tokens: int, batch: int = 1) -> dict[str, int]:
    """NAG's extra FLOPs over (off) for ``batch`` positive rows: per block, Z⁻ (QKᵀ and AV of the image
    tokens' queries against the NAG negative's K⁻/V⁻, cached: their projection and the negative's
    ``text_embedding`` cost nothing per step). Elementwise: the NAG combine on the image tokens, Z⁻'s softmax."""
    per_block = 4 * image_tokens * spec.negative_tokens * spec.hidden_size
    elementwise = (
        NAG_FLOPS_PER_Z * image_tokens * spec.hidden_size + SOFTMAX_FLOPS_PER_SCORE * spec.num_heads * image_tokens * spec.negative_tokens
    )
    return floor_of({"per_block": per_block}, batch, batch * spec.blocks * per_block, batch * spec.blocks * elementwise)


def wan_pass_flops(spec: WanSpec, image_tokens: int, batch: int = 1) -> int:
    """Matmul FLOPs of one forward over ``batch`` rows."""
    d, text, patch = spec.hidden_size, max(spec.prompt_tokens, spec.negative_tokens), 4 * spec.latent_channels
    embeddings = (
        linear_flops(image_tokens, patch, d) + linear_flops(text, spec.context_dim, d, d) + linear_flops(1, spec.frequency_dim, d, d)
    )
    self_attention = linear_flops(image_tokens, d, 4 * d) + attention_flops(spec, image_tokens)
    cross_attention = linear_flops(image_tokens, d, 2 * d) + linear_flops(text, d, 2 * d) + 4 * image_tokens * text * d
    per_block = self_attention + cross_attention + linear_flops(image_tokens, d, spec.ffn_hidden, d)
    final = linear_flops(1, d, 6 * d) + linear_flops(image_tokens, d, patch)  # time_projection, head
    return batch * (embeddings + spec.blocks * per_block + final)


def open_wan_pass(model: nn.Module, negative: torch.Tensor) -> WanPass:
    """A ``WanPass`` on ``model`` (hooked as on Forge Neo), in its window with the NAG negative ``negative``
    ``[1, tokens, 4096]`` after one denoiser callback at step 0; its callback is then removed, so that this
    benchmark drives it (``active``) and leaves nothing registered."""
    job = SimpleNamespace(p=object(), params=NAG_PARAMS)
    job.negative = SimpleNamespace(encode=lambda *_arguments: [[prompt_parser.ScheduledPromptConditioning(1, negative[0])]])
    engine = SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(SimpleNamespace(diffusion_model=model))))
    previous, shared.sd_model = shared.sd_model, engine
    try:
        nag_pass = WanPass(job, PassReport(is_hires=False))
        denoiser = SimpleNamespace(p=job.p, step=0, total_steps=1, sampler=SimpleNamespace(config=None))
        script_callbacks.cfg_denoiser_callback(script_callbacks.CFGDenoiserParams(None, None, torch.ones(1), 0, 1, None, None, denoiser))
    finally:
        shared.sd_model = previous
    script_callbacks.remove_callbacks_for_function(nag_pass.on_cfg_denoiser)
    return nag_pass


class WanBench(NeoBench):
    """Neo's Wan stand-in (text-to-video); (nag) is NAG through ``lib_nag.models.wan.WanPass``'s hooks on the
    model's cross-attention layers, its K⁻/V⁻ cache and the negative's ``text_embedding`` warm, as after a
    pass's first guided step. The hooks stay in place for (off) and (extra), the pass outside its window
    there (a few Python calls per block)."""

    variants = WAN_VARIANTS
    row_arguments = ("timestep",)
    timestep_scale = 1000
    targets = WAN_TARGETS
    nag_flops = staticmethod(wan_nag_flops)
    pass_flops = staticmethod(wan_pass_flops)
    blocks_text = "{spec.blocks} block(s), {spec.frames} latent frame(s), FFN {spec.ffn_hidden}"
    full_text = "{full.name}'s full model ({full.hidden_size} wide, {full.blocks} blocks, {full.frames} frame(s))"
    floor_template = (
        "Per block {per_block:,.2f} GFLOP: Z⁻, the image tokens' queries against the NAG negative's {spec.negative_tokens} cached keys "
        "and values (QKᵀ and AV)"
    )

    @property
    def full_model(self) -> WanSpec:
        """The full model of this width (1.3B or 14B), on the benchmark's frames."""
        return replace(WAN_14B if self.spec.hidden_size == WAN_14B.hidden_size else WAN_1_3B, frames=self.spec.frames)

    def architecture(self) -> nn.Module:
        if self.batch != 1:
            raise ValueError("Wan's latent is one video per row; NAG takes one NAG negative per call: batch 1 only")
        spec = self.spec
        return WanModel(
            in_dim=spec.latent_channels, dim=spec.hidden_size, ffn_dim=spec.ffn_hidden, freq_dim=spec.frequency_dim,
            text_dim=spec.context_dim, out_dim=spec.latent_channels, num_heads=spec.num_heads, num_layers=spec.blocks,
        )  # fmt: skip

    def nag(self, negative: Callable[[], Any]) -> Callable[..., torch.Tensor]:
        nag_pass = open_wan_pass(self.model, negative())
        like = torch.empty(0, device=self.device, dtype=self.dtype)
        embedded = nag_pass.negative_for_call(like)
        for module in cross_attention_layers(self.model):  # the K⁻/V⁻ cache, as the first guided step fills it
            nag_pass.kv.get(wan_layer(module, []), embedded, like)
        nag_pass.active = False  # (off) and (extra) run outside the window

        def forward(**arguments: Any) -> torch.Tensor:
            nag_pass.active = True
            try:
                return self.model(**arguments)
            finally:
                nag_pass.active = False

        return forward

    def profile(self, medians: dict[str, float]) -> list[str]:
        return super().profile(medians) + block_profile(self, medians)


def median_ms(call: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """The median time of ``repeats`` calls, in ms, after one untimed call."""
    call()
    return statistics.median(elapsed(call, device) for _ in range(repeats)) * 1e3


def block_profile(bench: WanBench, medians: dict[str, float], repeats: int = 9) -> list[str]:
    """Where (nag)'s extra time goes, at the real shapes of one block and free of the step-to-step noise: the
    inputs of one ``lib_nag.attention.guide_rows`` call (Z⁻ and the NAG combine, run by the out-projection's
    pre-hook) are kept from a (nag) step, then each part of NAG's work in a block is timed (median of
    ``repeats`` calls) beside the layer's own query projection, a linear layer of the model: the rate at
    which the FLOP floor would take its time. Z⁻ has the shape of the host's own cross-attention core."""
    from lib_nag import attention as nag_module

    kept: list[tuple] = []
    original = nag_module.guide_rows

    def keep(*args: Any) -> torch.Tensor:
        if not kept:
            kept.append((args[0].clone(), *args[1:]))
        return original(*args)

    nag_module.guide_rows = keep
    try:
        bench.run(bench.nag_key)
    finally:
        nag_module.guide_rows = original
    z, q, positive, k, v, heads, params, attend, _text = kept[0]
    module, device, spec = cross_attention_layers(bench.model)[0], bench.device, bench.spec
    k, v = positive.negatives(k), positive.negatives(v)
    rows = positive.take(z)
    copies = [z.clone() for _ in range(repeats + 1)]
    with torch.no_grad():
        z_negative = attend(q, k, v, heads)
        parts = {
            "the layer's query projection (a linear layer of the model)": (
                median_ms(lambda: module.q(z), device, repeats),
                linear_flops(z.shape[1], spec.hidden_size, spec.hidden_size),
            ),
            f"Z⁻: SDPA of the image queries against the {k.shape[1]} cached K⁻/V⁻": (
                median_ms(lambda: attend(q, k, v, heads), device, repeats),
                4 * q.shape[1] * k.shape[1] * spec.hidden_size,
            ),
            "the NAG combine (Z̃, two L1 norms, τ cap, α blend; fp32)": (
                median_ms(lambda: nag_combine(rows, z_negative, params.scale, params.tau, params.alpha), device, repeats),
                0,
            ),
            "guide_rows: Z⁻, the combine, the guided rows written back": (
                median_ms(lambda: original(copies.pop(), q, positive, k, v, heads, params, attend), device, repeats),
                0,
            ),
            "the hooks' copy of the positive queries and their q-norm": (
                median_ms(lambda: module.norm_q(positive.take(z).clone()), device, repeats),
                0,
            ),
        }
    (linear_ms, linear_flop), (z_ms, z_flop), (combine_ms, _), (guide_ms, _), (hook_ms, _) = parts.values()
    rate = linear_flop / linear_ms  # FLOPs per ms
    work, floor_ms = guide_ms + hook_ms, bench.floor()["floor_flops"] / spec.blocks / rate
    off_ms = medians[bench.off] * 1e3
    return [
        "",
        f"Profile (--profile): NAG's work in one block at its real shapes, each part the median of {repeats} calls:",
        "",
        "| part | ms per block | GFLOP | GFLOP/s |",
        "|---|---:|---:|---:|",
        *(
            f"| {part} | {ms:,.1f} | {flop / 1e9:,.2f} | {flop / ms / 1e6:,.1f} |" if flop else f"| {part} | {ms:,.1f} | — | — |"
            for part, (ms, flop) in parts.items()
        ),
        "",
        f"Per block NAG's work (guide_rows and the hooks') takes {work:,.1f} ms, {work / floor_ms:.2f}× its analytic floor at the rate "
        f"of the query projection timed beside it ({floor_ms:,.1f} ms): Z⁻'s SDPA runs at {z_flop / z_ms / rate:.0%} of that rate "
        f"(+{z_ms - z_flop / rate:,.1f} ms), and the elementwise work (the combine, the guided rows written back, the queries' copy "
        f"and norm) takes {guide_ms - z_ms + hook_ms:,.1f} ms, of which the combine {combine_ms:,.1f}. Per step, {spec.blocks} "
        f"block(s): {spec.blocks * work:,.0f} ms = {spec.blocks * work / off_ms:.1%} of the (off) step's timed median {off_ms:,.0f} ms.",
    ]


NEO_BENCHES: dict[type, type[DiTBench]] = {
    QwenSpec: QwenBench,
    NextDiTSpec: NextDiTBench,
    Flux2Spec: Flux2Bench,
    ErnieSpec: ErnieBench,
    KreaSpec: KreaBench,
    WanSpec: WanBench,
}
NEO_SIZES: dict[str, tuple[Any, Any]] = {  # (the reduced depth at the real width, the CPU default; the full model, the CUDA default)
    "qwen": (QWEN_CPU, QWEN),
    "zimage": (replace(ZIMAGE, **REDUCED_NEXTDIT), ZIMAGE),
    "lumina2": (replace(LUMINA2, **REDUCED_NEXTDIT), LUMINA2),
    "flux2": (KLEIN_CPU, KLEIN_4B),
    "ernie": (ERNIE_CPU, ERNIE),
    "krea": (KREA_CPU, KREA),
    "wan": (WAN_CPU, WAN_14B),
}
NEO_TINY = {
    "tiny-qwen": TINY_QWEN,
    "tiny-zimage": TINY_ZIMAGE,
    "tiny-lumina2": TINY_LUMINA2,
    "tiny-flux2": TINY_FLUX2,
    "tiny-ernie": TINY_ERNIE,
    "tiny-krea": TINY_KREA,
    "tiny-wan": TINY_WAN,
}
