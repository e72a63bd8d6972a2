"""AUTOMATIC1111 (1.6–1.10): its diffusion model, and the model families it runs."""

from ..models.registry import FAMILIES
from ..webui import a1111_rows
from ..webui.family import A1111
from ..webui.job import NagHost


class A1111Host(NagHost):
    name = "AUTOMATIC1111"
    kind = A1111
    families = FAMILIES
    diffusion_model = staticmethod(a1111_rows.diffusion_model)
