"""The Flux.2 family: Flux.2 Klein 4B and 9B on Forge Neo, the ``global_modulation`` form of Neo's
``IntegratedFluxTransformer2DModel`` (``backend/nn/flux.py``, its port of ComfyUI v0.9 ``comfy/ldm/flux``,
read at Haoming02/sd-webui-forge-classic 06d6af9a and in the Neo v3.5 copy exo101/sd-webui-forge-neo-v3
@ 5692d2d1; the engine ``backend/diffusion_engine/flux2.py`` and ``text_processing/klein_engine.py``
read in that copy).

Flux.2 shares Flux.1's model class, its ``forward`` (patches, reference latents, text ids) and its
``forward_orig`` entry point, so NAG runs it with ``flux``'s runner and ``flux_blocks``' block loop; this
module gives what differs: recognition, the modulations and the pass. Flux.2's blocks have no
modulation layers: one modulation of the time embedding (no pooled text vector) serves every double
block's image stream (``double_stream_modulation_img``), every double block's text stream
(``double_stream_modulation_txt``) and every single block (``single_stream_modulation``); the final
layer takes the time embedding. Its gated SiLU MLPs run as the host's own block submodules, ``txt_norm``
(where present) and the text ids on ``txt_ids_dims`` (axis 3, ``0 … L−1``) as Neo's ``forward`` makes
them, reference latents (Klein's edits) as image tokens, fp16 clipping where Neo clips.

The authors' ComfyUI-NAG (ef8a641) has no Flux.2 code; NAG here follows their Flux pattern
(``flux/model.py`` NAGFlux, ``flux/layers.py``): one NAG row per positive row, its text the NAG negative
(``txt_in`` of its context, its text ids its own, ``0 … L′−1`` on axis 3), its modulations its positive
row's (they carry no text, so the authors' ``txt_mod(vec)`` of the NAG rows gives the same values);
in the double blocks the NAG text attends with the positive row's image q/k/v and the image attention
output is guided. In the single blocks the authors' NAG row is ``[NAG text; image]`` with the guided
image output written into both rows; as the modulation carries no text, that row's image tokens stay
its positive row's, so NAG runs the NAG rows as their text alone (``Modulations.text_free``; equal, see
``tests/test_flux2.py``).

The NAG negative is encoded as a negative prompt: Klein's engine, encoding a positive one, sets the
reference latents again from its stored ones and the consumed img2img latent (``FluxPass``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..webui.conditioning import crossattn
from ..webui.family import FORGE, ModelFamily
from .flux import FluxPass, is_joint_transformer
from .flux_blocks import DoubleModulations, Inputs, Modulation, Modulations, triples

GLOBAL_MODULATIONS = ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation")


def _rows(modulation: Modulation, inputs: Inputs) -> Modulation:
    """The NAG rows' modulation: their positive rows'."""
    return tuple(inputs.positive.take(t) for t in modulation)


@dataclass(frozen=True)
class Flux2Modulations:
    """Flux.2's global modulations of the batch, and the NAG rows' (their positive rows'): the same for
    every block of a kind."""

    vec: torch.Tensor
    img: DoubleModulations
    txt: DoubleModulations
    txt_negative: DoubleModulations
    single_stream: Modulation
    single_stream_negative: Modulation
    text_free = True

    def double(self, index: int, block: torch.nn.Module) -> tuple[DoubleModulations, DoubleModulations, DoubleModulations]:
        return self.img, self.txt, self.txt_negative

    def single(self, index: int, block: torch.nn.Module) -> tuple[Modulation, Modulation]:
        return self.single_stream, self.single_stream_negative

    def final(self, model: torch.nn.Module, img: torch.Tensor) -> torch.Tensor:
        return model.final_layer(img, self.vec)


def flux2_modulations(model: torch.nn.Module, host: Any, inputs: Inputs, conditioning: Any) -> tuple[Modulations, torch.Tensor]:
    """Neo's Flux.2 ``vec``: the time embedding (plus the guidance's for a guidance-embedded model when
    the call gives one), through the three global modulations; and the NAG negative's context (Klein's
    conditioning is the Qwen3 tensor ``[images, tokens, 3·hidden]``)."""
    vec = model.time_in(host.timestep_embedding(inputs.timestep, 256).to(inputs.dtype))
    if model.guidance_embed and inputs.guidance is not None:
        vec = vec + model.guidance_in(host.timestep_embedding(inputs.guidance, 256).to(inputs.dtype))
    img, txt, (single,) = (triples(getattr(model, name)(vec)) for name in GLOBAL_MODULATIONS)
    txt_negative = tuple(_rows(modulation, inputs) for modulation in txt)
    modulations = Flux2Modulations(vec, img, txt, txt_negative, single, _rows(single, inputs))
    return modulations, crossattn(conditioning)


def _unsupported_variant(model: Any) -> str:
    """What of a Flux.2-form model (Neo's port with global modulations) NAG does not run; "" for none."""
    if hasattr(model, "vec_in_dim"):
        return "a pooled text vector in its modulation"
    if not all(hasattr(model, name) for name in GLOBAL_MODULATIONS):
        return "no global modulation layers"
    if any(getattr(block, "flipped_img_txt", False) for block in model.double_blocks):
        return "image-first double blocks"
    if any(getattr(block, "yak_mlp", False) for block in model.single_blocks):
        return "the yak MLP"
    return ""


def _is_flux2_form(model: Any) -> bool:
    """Neo's Flux port (``forward_orig``) with global modulations, not Chroma."""
    return (
        is_joint_transformer(model)
        and hasattr(model, "forward_orig")
        and getattr(model, "global_modulation", False) is True
        and not hasattr(model, "distilled_guidance_layer")
    )


def is_flux2(model: Any) -> bool:
    """Neo's Flux.2 as its Klein checkpoints build it: global modulations of the time embedding, no
    pooled vector, text before image, gated SiLU (or GELU) MLPs."""
    return _is_flux2_form(model) and not _unsupported_variant(model)


def unsupported_flux2(model: Any) -> str:
    """Why a Flux.2-form model that NAG does not run is not run ("" for any other model)."""
    variant = _unsupported_variant(model) if _is_flux2_form(model) else ""
    return f"NAG runs Forge Neo's Flux.2 (Klein); this {type(model).__name__} has {variant}, not supported yet" if variant else ""


class Flux2Pass(FluxPass):
    """NAG on Neo's Flux.2 for one sampling pass: ``flux``'s runner with Flux.2's modulations."""

    modulations_of = staticmethod(flux2_modulations)


FAMILY = ModelFamily("Flux.2", {FORGE: Flux2Pass}, is_flux2, unsupported_flux2)
