"""Every model family NAG runs, in the order the hosts try them: the families with their own
recognisers first (Flux.2 before Flux, whose model class it shares), the UNet (any model with
cross-attention layers) last. PiD is here only to say why NAG stands aside for it."""

from ..webui.family import ModelFamily
from . import anima, ernie, flux, flux2, krea, mmdit, nextdit, pid, qwen, unet, wan

FAMILIES: tuple[ModelFamily, ...] = (
    mmdit.FAMILY,
    flux2.FAMILY,
    flux.FAMILY,
    qwen.FAMILY,
    nextdit.FAMILY,
    ernie.FAMILY,
    krea.FAMILY,
    wan.FAMILY,
    anima.FAMILY,
    pid.FAMILY,
    unet.FAMILY,
)
