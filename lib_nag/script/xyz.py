"""XYZ-plot axes for NAG, registered once into the host's ``xyz_grid.py`` module."""

from __future__ import annotations

from functools import partial
from typing import Any

from ..params import DEFAULTS
from ..webui.job import set_xyz_override

PREFIX = "[NAG]"
AXES = (
    ("enabled", "Enabled"),
    ("scale", "Scale"),
    ("tau", "Tau"),
    ("alpha", "Alpha"),
    ("end", "End"),
    ("sigma_end", "Sigma end"),
    ("negative_prompt", "Negative prompt"),
)


def xyz_module() -> Any:
    from modules import scripts

    return next((data.module for data in scripts.scripts_data if data.script_class.__module__ == "xyz_grid.py"), None)


def apply(p: Any, value: Any, _values: list, *, name: str) -> None:
    set_xyz_override(p, name, str(value).strip().lower() == "true" if name == "enabled" else value)


def confirm(_p: Any, values: list, *, name: str) -> None:
    """Reject a bad axis value before the plot starts, naming the field."""
    for value in values:
        DEFAULTS.with_overrides({name: value})


def register_axes() -> None:
    """Add the ``[NAG]`` axes unless the XYZ script is absent or already has them (the host
    calls this before every UI build)."""
    xyz = xyz_module()
    if xyz is None or any(option.label.startswith(PREFIX) for option in xyz.axis_options):
        return
    for name, title in AXES:
        label = f"{PREFIX} {title}"
        if name == "enabled":
            option = xyz.AxisOption(label, str, partial(apply, name=name), choices=xyz.boolean_choice(reverse=True))
        else:
            kind = str if name == "negative_prompt" else float
            option = xyz.AxisOption(label, kind, partial(apply, name=name), confirm=partial(confirm, name=name))
        xyz.axis_options.append(option)
