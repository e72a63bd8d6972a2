"""What every family that runs the whole model shares (SD3's MMDiT, Qwen-Image, NextDiT, ERNIE, Krea 2;
Flux marks its forward the same way): a ``Runner`` that holds one model's guided ``forward``, that
forward marked as NAG's (``patched_forward``), and on Forge the pass that sets it as an object patch of
the model's ``forward`` with the rows of each call from ``transformer_options`` (``RunnerPass``)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch

from ..params import NagParams
from ..webui.forge_patcher import ForgeModelPass, RowsOf, forge_rows
from ..webui.passes import NAG_FORWARD, Forward, OnCall


class Runner:
    """The guided ``forward`` of one model; a family's subclass defines ``forward``, which asks
    ``rows_of(x, context, kwargs)`` for the call's positive rows and runs the model's own ``forward``
    when there are none. ``negative()`` is the NAG negative now (one row per image); ``on_call`` is told,
    for each call with positive rows, whether it was guided and if not, why. ``host`` is the model's
    module, whose functions (RoPE, attention) NAG calls as the model does."""

    def __init__(
        self, model: torch.nn.Module, negative: Callable[[], Any], params: NagParams, rows_of: RowsOf, on_call: OnCall | None = None
    ) -> None:
        self.model, self.negative, self.params, self.rows_of, self.on_call = model, negative, params, rows_of, on_call
        self.host = sys.modules[type(model).__module__]

    def told(self, guided: bool, why: str) -> None:
        if self.on_call is not None:
            self.on_call(guided, why)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        raise NotImplementedError


def patched_forward(entry: Callable[..., torch.Tensor]) -> Forward:
    """``entry`` (a runner's guided method) as a function to set on the model, marked as NAG's: a
    function, so that the patcher's deep copies of its options copy no model."""

    def forward(*args: Any, **kwargs: Any) -> torch.Tensor:
        return entry(*args, **kwargs)

    setattr(forward, NAG_FORWARD, True)
    return forward


class RunnerPass(ForgeModelPass):
    """NAG on a whole-model family for one sampling pass on Forge: its ``runner``'s forward as the
    object patch, with Forge's rows while the pass is in its window."""

    runner: type[Runner] = Runner

    def nag_forward(self, model: torch.nn.Module) -> Forward:
        count = self.nag.count(self.report)
        rows = forge_rows(self.weak(lambda nag_pass: nag_pass.active, False), count)
        return patched_forward(self.runner(model, self.weak(lambda nag_pass: nag_pass.nag.negative), self.params, rows, count).forward)
