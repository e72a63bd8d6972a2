"""What Forge Neo's single-stream families share (``ernie``: ERNIE-Image, ``krea``: Krea 2): a guided
``forward`` that runs the model's blocks with the NAG rows as their text alone (the modulation of these
models carries no text, see ``lib_nag.joint_attention.single_stream_text_attention``), set as an object
patch of the model's ``forward`` on the pass's cloned patcher (``runner.RunnerPass``). A family module
writes its ``runner.Runner`` (the model's forward with the NAG rows) and its block, names its pass's
runner, and lists the parts of the model NAG calls (``Anatomy``), by which the family recognises its
models."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..attention import PositiveRows
from ..joint_attention import QKV, Attend, single_stream_text_attention
from ..params import NagParams


@dataclass(frozen=True)
class BlockCall:
    """What every block of one guided call needs: the positive rows, the batch's text length and token
    order, the rotary tables of the batch and of the NAG rows' ``[image; NAG text]`` sequence (in the
    batch's order), the host's attention and the NAG parameters."""

    positive: PositiveRows
    text_tokens: int
    text_first: bool
    pe: torch.Tensor
    pe_negative: torch.Tensor
    attend: Attend
    params: NagParams

    def attention(self, qkv: QKV, text_negative: QKV) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's attention output (positive rows' image tokens guided) and the NAG text's."""
        return single_stream_text_attention(
            qkv, text_negative, self.text_tokens, self.text_first, self.positive, self.pe, self.pe_negative, self.attend, self.params
        )


def _has(owner: Any, path: str) -> bool:
    for name in path.split("."):
        if not hasattr(owner, name):
            return False
        owner = getattr(owner, name)
    return True


@dataclass(frozen=True)
class Anatomy:
    """The parts of a model that NAG calls, as read in Neo at 5692d2d1 (dotted paths): the model's own,
    each block's (the blocks in the list ``blocks``) and its module's (``host``). A model of the class
    ``class_name``, or with the model's parts, that lacks any of them is another build, not run."""

    family: str
    class_name: str
    model: tuple[str, ...]
    blocks: str
    block: tuple[str, ...]
    host: tuple[str, ...]

    def looks_alike(self, model: Any) -> bool:
        return type(model).__name__ == self.class_name or all(_has(model, path) for path in self.model)

    def recognises(self, model: Any) -> bool:
        if not (self.looks_alike(model) and all(_has(model, path) for path in (*self.model, self.blocks))):
            return False
        host = sys.modules.get(type(model).__module__)
        blocks_as_read = all(_has(block, path) for block in getattr(model, self.blocks) for path in self.block)
        return blocks_as_read and all(_has(host, path) for path in self.host)

    def unsupported(self, model: Any) -> str:
        if self.looks_alike(model) and not self.recognises(model):
            return (
                f"NAG runs Forge Neo's {self.family} as read at 5692d2d1; this {type(model).__name__} is built otherwise, not supported yet"
            )
        return ""
