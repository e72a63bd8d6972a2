"""Every model family NAG runs, in the order the hosts try them: the families with their own
recognisers first, the UNet (any model with cross-attention layers) last."""

from ..webui.family import ModelFamily
from . import anima, flux, mmdit, pid, unet, wan

FAMILIES: tuple[ModelFamily, ...] = (mmdit.FAMILY, flux.FAMILY, wan.FAMILY, anima.FAMILY, pid.FAMILY, unet.FAMILY)
