"""Every model family NAG runs, in the order the hosts try them: the families with their own
recognisers first (Flux.2 before Flux, whose model class it shares), the UNet (any model with
cross-attention layers) last."""

from ..webui.family import ModelFamily
from . import ernie, flux, flux2, krea, mmdit, nextdit, qwen, unet

FAMILIES: tuple[ModelFamily, ...] = (
    mmdit.FAMILY,
    flux2.FAMILY,
    flux.FAMILY,
    qwen.FAMILY,
    nextdit.FAMILY,
    ernie.FAMILY,
    krea.FAMILY,
    unet.FAMILY,
)
