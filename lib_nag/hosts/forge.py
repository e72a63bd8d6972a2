"""The Forge family (Forge 2, reForge, Forge Classic, Forge Neo): which Forge this is, its diffusion
model, and the model families it runs."""

from importlib.util import find_spec

from ..models.registry import FAMILIES
from ..webui import forge_patcher
from ..webui.family import FORGE
from ..webui.job import NagHost


class ForgeHost(NagHost):
    kind = FORGE
    families = FAMILIES
    diffusion_model = staticmethod(forge_patcher.diffusion_model)

    def __init__(self) -> None:
        super().__init__()
        self.name = forge_variant()


def forge_variant() -> str:
    """Which Forge, for the start-up line: by what the host ships, not by its name."""
    from modules_forge import forge_version

    if find_spec("backend") is not None:
        return "Forge Neo" if getattr(forge_version, "version", "") == "neo" else "Forge"
    return "reForge" if find_spec("ldm_patched.modules.patcher_extension") is not None else "Forge Classic"
