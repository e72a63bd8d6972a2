"""Every model family NAG runs, in the order the hosts try them: the families with their own
recognisers first, the UNet (any model with cross-attention layers) last."""

from ..webui.family import ModelFamily
from . import ernie, flux, krea, mmdit, unet

FAMILIES: tuple[ModelFamily, ...] = (mmdit.FAMILY, flux.FAMILY, ernie.FAMILY, krea.FAMILY, unet.FAMILY)
