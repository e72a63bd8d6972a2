"""Deterministic fake checkpoints for the A1111 stand-in (not host code): real tiny ``ldm`` UNets, a hashed-word
text encoder with A1111's chunking (75 tokens + BOS/EOS per 77-token chunk, ``BREAK``, batch padded to the
same number of chunks), and the model surface A1111's sampling reads."""

from __future__ import annotations

import contextlib
import itertools
import re
import zlib
from dataclasses import dataclass

import torch
from ldm.modules.diffusionmodules.util import timestep_embedding
from modules import shared
from modules.sd_models import CheckpointInfo
from torch import nn
from unets import randomize_outputs, sd1_like_unet, sdxl_like_unet

VOCAB, BOS, EOS, CHUNK = 1000, 0, 1, 75


@dataclass(frozen=True)
class Family:
    kind: str  # "ldm" (LatentDiffusion) or "sgm" (DiffusionEngine)
    context: int
    adm: int = 0  # width of sgm's ``vector``
    pooled: int = 0  # pooled text part of ``vector``
    size_keys: tuple[str, ...] = ()  # the size/crop/aesthetic embeddings of ``vector``, 256 wide each
    latent_channels: int = 4


FAMILIES = {
    "sd1": Family("ldm", 768),
    "sd2": Family("ldm", 1024),
    "edit": Family("ldm", 768),
    "sdxl": Family("sgm", 2048, 2816, 1280, ("h", "w", "crop_top", "crop_left", "h", "w")),
    "sdxl_refiner": Family("sgm", 1280, 2560, 1280, ("h", "w", "crop_top", "crop_left", "aesthetic")),
    "sd3": Family("sgm", 4096, 2048, 2048, latent_channels=16),
    "dit": Family("sgm", 4096, 2048, 2048, latent_channels=16),  # an architecture NAG does not know
}
_serial = itertools.count()


def tokenize(text: str) -> list[list[int]]:
    """Words (split on whitespace and commas) hashed into the vocabulary, in chunks of at most 75; ``BREAK`` ends a chunk."""
    chunks, current = [], []
    for word in re.split(r"[\s,]+", text):
        if word == "BREAK":
            chunks.append(current)
            current = []
        elif word:
            if len(current) == CHUNK:
                chunks.append(current)
                current = []
            current.append(2 + zlib.crc32(word.lower().encode()) % (VOCAB - 2))
    if current or not chunks:
        chunks.append(current)
    return chunks


class TextEncoder(nn.Module):
    """A fixed random embedding table plus position embeddings; the pooled output is the first chunk's mean."""

    def __init__(self, width: int, pooled: int, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(torch.randn(VOCAB, width, generator=g) * 0.5, requires_grad=False)
        self.positions = nn.Parameter(torch.randn(CHUNK + 2, width, generator=g) * 0.1, requires_grad=False)
        self.pooled_table = nn.Parameter(torch.randn(VOCAB, pooled, generator=g) * 0.5, requires_grad=False) if pooled else None

    def forward(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        chunked = [tokenize(t) for t in texts]
        count = max(len(c) for c in chunked)  # every prompt of a batch gets the same number of chunks
        ids = torch.tensor([[[BOS, *ch] + [EOS] * (CHUNK + 1 - len(ch)) for ch in c + [[]] * (count - len(c))] for c in chunked])
        crossattn = (self.table[ids] + self.positions).reshape(len(texts), count * (CHUNK + 2), -1)
        pooled = self.pooled_table[ids[:, 0]].mean(1) if self.pooled_table is not None else None
        return crossattn, pooled


def tiny_mmdit(spec: Family) -> nn.Module:
    """SD3 Medium's MMDiT (the stand-in of modules/models/sd3/mmdit.py), tiny, with random weights."""
    from modules.models.sd3.mmdit import MMDiT

    mmdit = MMDiT(in_channels=spec.latent_channels, depth=2, adm_in_channels=spec.adm, context_in=spec.context)
    for tensor in (*mmdit.parameters(), *mmdit.buffers()):
        tensor.copy_(torch.randn_like(tensor) * 0.1)
    return mmdit.eval()


class TinyJointNet(nn.Module):
    """A DiT-like denoiser of an architecture NAG does not know: no ``attn2``, no MMDiT blocks."""

    def __init__(self, channels: int, context: int, adm: int, hidden: int = 32):
        super().__init__()
        self.proj_in, self.proj_out = nn.Conv2d(channels, hidden, 3, padding=1), nn.Conv2d(hidden, channels, 3, padding=1)
        self.context_proj, self.y_proj = nn.Linear(context, hidden), nn.Linear(adm, hidden)

    def forward(self, x, timesteps=None, context=None, y=None):
        emb = self.context_proj(context.mean(1)) + self.y_proj(y) + timestep_embedding(timesteps, self.proj_in.out_channels)
        return self.proj_out(nn.functional.silu(self.proj_in(x) + emb[:, :, None, None]))


class ModelWrapper(nn.Module):
    """ldm's DiffusionWrapper / sgm's OpenAIWrapper: holds ``diffusion_model`` and ``conditioning_key``."""

    def __init__(self, diffusion_model: nn.Module, conditioning_key: str):
        super().__init__()
        self.diffusion_model, self.conditioning_key = diffusion_model, conditioning_key


class FakeSdModel(nn.Module):
    """A LatentDiffusion (SD1/SD2/InstructPix2Pix) or DiffusionEngine (SDXL/refiner/SD3) look-alike."""

    def __init__(self, family: str, seed: int = 0):
        super().__init__()
        spec = self.family = FAMILIES[family]
        self.family_name = family
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            if family == "sd3":
                unet = tiny_mmdit(spec)
            elif family == "dit":
                unet = TinyJointNet(spec.latent_channels, spec.context, spec.adm)
            elif spec.kind == "sgm":
                unet = randomize_outputs(sdxl_like_unet(context_dim=spec.context, adm_channels=spec.adm))
            else:
                unet = randomize_outputs(sd1_like_unet(context_dim=spec.context, in_channels=8 if family == "edit" else 4))
        self.model = ModelWrapper(unet, "hybrid" if family == "edit" else "crossattn")
        self.text = TextEncoder(spec.context, spec.pooled, seed * 7919 + zlib.crc32(family.encode()))
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
        self.register_buffer("alphas_cumprod", torch.cumprod(1.0 - betas, dim=0).float())
        self.parameterization = "eps"
        self.is_sd1, self.is_sd2 = family in ("sd1", "edit"), family == "sd2"
        self.is_sdxl, self.is_ssd, self.is_sd3, self.is_sdxl_inpaint = family in ("sdxl", "sdxl_refiner"), False, family == "sd3", False
        self.cond_stage_key = "edit" if family == "edit" else "txt"
        self.latent_channels = spec.latent_channels
        if spec.kind == "sgm":
            self.conditioner = self.text
        else:
            self.cond_stage_model = self.text
            if family == "sd2":
                self.text.model = nn.Identity()  # the host tells SD2 by ``cond_stage_model.model``
        name = f"fake-{family}-{seed}-{next(_serial)}"
        self.sd_checkpoint_info = CheckpointInfo(name, shorthash=f"{zlib.crc32(name.encode()):010x}"[:10])
        self.sd_model_hash = self.sd_checkpoint_info.shorthash
        self.sd_model_checkpoint = self.sd_checkpoint_info.filename
        self.cond_stage_model_empty_prompt = self._crossattn(self.get_learned_conditioning([""]))
        self.eval()

    @staticmethod
    def _crossattn(cond):
        return cond["crossattn"] if isinstance(cond, dict) else cond

    def get_learned_conditioning(self, batch):
        """ldm: a tensor ``[B, 77k, C]``; sgm: ``{'crossattn', 'vector'}`` as sd_models_xl.get_learned_conditioning builds it."""
        crossattn, pooled = self.text(list(batch))
        if self.family.kind == "ldm":
            return crossattn
        width, height = getattr(batch, "width", 1024) or 1024, getattr(batch, "height", 1024) or 1024
        is_negative = getattr(batch, "is_negative_prompt", False)
        if is_negative and all(x == "" for x in batch) and not self.is_sd3:  # force_zero_embeddings=['txt']
            crossattn, pooled = torch.zeros_like(crossattn), torch.zeros_like(pooled)
        values = {
            "h": height,
            "w": width,
            "crop_top": shared.opts.sdxl_crop_top,
            "crop_left": shared.opts.sdxl_crop_left,
            "aesthetic": shared.opts.sdxl_refiner_low_aesthetic_score if is_negative else shared.opts.sdxl_refiner_high_aesthetic_score,
        }
        parts = [pooled]
        if self.family.size_keys:
            sizes = timestep_embedding(torch.tensor([float(values[k]) for k in self.family.size_keys]), 256).flatten()
            parts.append(sizes.expand(len(batch), -1))
        return {"crossattn": crossattn, "vector": torch.cat(parts, dim=1)}

    def apply_model(self, x, t, cond):
        """ldm: ``c_crossattn`` concatenated on tokens, ``c_concat`` on channels for hybrid models; sgm: crossattn + vector."""
        if self.family.kind == "ldm":
            if self.model.conditioning_key == "hybrid":
                x = torch.cat([x, *cond["c_concat"]], dim=1)
            return self.model.diffusion_model(x, t, context=torch.cat(cond["c_crossattn"], 1))
        return self.model.diffusion_model(x, t, context=cond["crossattn"], y=cond["vector"])

    def ema_scope(self, context=None):
        return contextlib.nullcontext()

    def create_denoiser_for_sd3(self):
        """SD3's ``create_denoiser`` (installed as ``create_denoiser`` on sd3 models): here a CompVis eps wrapper."""
        from modules.sd_samplers_kdiffusion import CompVisDenoiser

        return CompVisDenoiser(self)


class PooledUNet(nn.Module):
    """A UNet run on the latent averaged down to ``side``×``side``, its output scaled back up (nearest):
    a job at the WebUI's default 512² costs what a 64² one does. The UNet's modules are unchanged."""

    def __init__(self, unet: nn.Module, side: int = 8):
        super().__init__()
        self.unet, self.side = unet, side

    def forward(self, x, timesteps=None, **kwargs):
        out = self.unet(nn.functional.adaptive_avg_pool2d(x, self.side), timesteps, **kwargs)
        return nn.functional.interpolate(out, size=x.shape[-2:], mode="nearest")


def make_sd_model(family: str, seed: int = 0, *, pooled: bool = False) -> FakeSdModel:
    """A new fake checkpoint of ``family`` (sd1, sd2, sdxl, sdxl_refiner, edit, sd3) with its own
    checkpoint info; ``pooled``: its UNet sees an 8×8 latent whatever the image size (``PooledUNet``)."""
    model = FakeSdModel(family, seed)
    if family in ("sd3", "dit"):
        model.create_denoiser = model.create_denoiser_for_sd3
    if pooled:
        model.model.diffusion_model = PooledUNet(model.model.diffusion_model)
    return model
