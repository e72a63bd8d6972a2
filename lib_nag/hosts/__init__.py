"""The hosts: AUTOMATIC1111 and the Forge family, each picking the model family of the loaded model
from the registry (``lib_nag.models.registry``).

The host is recognised by what it ships, not by its name: the Forge family (Forge, reForge,
Forge Classic, Neo) has ``modules_forge`` and samples through a UNet patcher; A1111 has neither.
"""

from importlib.util import find_spec

from ..webui.job import NagHost
from ..webui.report import CONSOLE_PREFIX


def detect_host() -> NagHost:
    if find_spec("modules_forge") is not None:
        from .forge import ForgeHost

        return ForgeHost()
    from .a1111 import A1111Host

    return A1111Host()


HOST = detect_host()
print(f"{CONSOLE_PREFIX} host: {HOST.name}")
