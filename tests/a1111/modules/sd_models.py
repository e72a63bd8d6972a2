"""Mirrors modules/sd_models.py (v1.10.1): checkpoint infos, model switching, ``SkipWritingToConfig``.

Stand-in: a "checkpoint" is a model object registered with ``register``; loading swaps ``shared.sd_model``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modules import shared


@dataclass(eq=False)
class CheckpointInfo:
    """Mirrors sd_models.CheckpointInfo (v1.10.1), naming fields only; compared by identity like the host."""

    name: str
    title: str = ""
    short_title: str = ""
    name_for_extra: str = ""
    model_name: str = ""
    filename: str = ""
    shorthash: str = field(default="0123456789")

    def __post_init__(self) -> None:
        self.title = self.title or f"{self.name}.safetensors [{self.shorthash}]"
        self.short_title = self.short_title or f"{self.name} [{self.shorthash}]"
        self.name_for_extra = self.name_for_extra or self.name
        self.model_name = self.model_name or self.name
        self.filename = self.filename or f"/models/Stable-diffusion/{self.name}.safetensors"


checkpoints_list: dict[str, CheckpointInfo] = {}
checkpoint_models: dict[str, Any] = {}
"""Stand-in only: the model object each registered checkpoint title loads."""


def register(model: Any) -> CheckpointInfo:
    """Stand-in only: make ``model`` loadable through its ``sd_checkpoint_info``."""
    info = model.sd_checkpoint_info
    checkpoints_list[info.title] = info
    checkpoint_models[info.title] = model
    return info


def load_model(model: Any) -> Any:
    """Mirrors sd_models.load_model (v1.10.1): the model becomes ``shared.sd_model`` and the selected checkpoint."""
    info = register(model)
    shared.sd_model = model
    if not SkipWritingToConfig.skip:
        shared.opts.sd_model_checkpoint = info.title
    return model


def select_checkpoint() -> CheckpointInfo | None:
    """Mirrors sd_models.select_checkpoint (v1.10.1): the checkpoint named by ``opts.sd_model_checkpoint``."""
    return checkpoints_list.get(shared.opts.sd_model_checkpoint) or next(iter(checkpoints_list.values()), None)


def get_closet_checkpoint_match(search_string: str) -> CheckpointInfo | None:
    """Mirrors sd_models.get_closet_checkpoint_match (v1.10.1): by title, then by name."""
    if search_string in checkpoints_list:
        return checkpoints_list[search_string]
    return next((i for i in checkpoints_list.values() if search_string in (i.name, i.model_name, i.short_title, i.name_for_extra)), None)


def reload_model_weights(sd_model=None, info=None, forced_reload=False):
    """Mirrors sd_models.reload_model_weights (v1.10.1): load ``info`` (default: the selected checkpoint) unless loaded."""
    info = info or select_checkpoint()
    current = shared.sd_model
    if info is None or (current is not None and current.sd_checkpoint_info is info and not forced_reload):
        return current
    if (
        current is not None
        and sd_model is None
        and info is select_checkpoint()
        and current.sd_checkpoint_info not in checkpoints_list.values()
    ):
        return current  # stand-in only: a model assigned to shared.sd_model without registering it stays loaded
    return load_model(checkpoint_models[info.title])


class SkipWritingToConfig:
    """Mirrors sd_models.SkipWritingToConfig (v1.10.1): loads inside it do not change ``opts.sd_model_checkpoint``."""

    skip = False
    previous = None

    def __enter__(self):
        self.previous, SkipWritingToConfig.skip = SkipWritingToConfig.skip, True
        return self

    def __exit__(self, exc_type, exc_value, exc_traceback):
        SkipWritingToConfig.skip = self.previous
