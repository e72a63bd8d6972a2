"""The contract between a model family and the hosts: which diffusion models the family recognises,
and which pass runs NAG on them in each host."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .passes import NagPass

A1111 = "AUTOMATIC1111"  # A1111 1.6–1.10: the model as ``sd_model.model.diffusion_model``
FORGE = "Forge"  # the Forge family: the model inside ``sd_model.forge_objects.unet``


def _alike_to_none(_model: torch.nn.Module) -> str:
    return ""


@dataclass(frozen=True)
class ModelFamily:
    """A kind of diffusion model NAG runs. ``passes`` gives the pass class per host (``A1111``,
    ``FORGE``); ``recognises(model)`` says whether NAG runs this diffusion model; ``unsupported(model)``
    says why not, for a model that looks like the family's but is a variant NAG does not run ("" for
    any other model)."""

    name: str
    passes: Mapping[str, type[NagPass]]
    recognises: Callable[[torch.nn.Module], bool]
    unsupported: Callable[[torch.nn.Module], str] = _alike_to_none
