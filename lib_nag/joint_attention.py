"""NAG in joint text–image attention (Flux.1, Chroma, SD3's MMDiT), shared by every host.

These models attend over ``[text; image]`` tokens in one call. NAG adds one row per positive row (a
"NAG row") whose text is the NAG negative prompt; the image tokens' attention output of the positive
row is guided away from the NAG row's (``nag_combine``), as the authors' ComfyUI-NAG does:

- double-stream blocks (and every joint block of SD3's MMDiT): the NAG row has no image stream of its own; it attends with the positive
  row's image q/k/v over its own text, and its text stream is updated by its own attention output;
- single-stream blocks: the NAG row is a full stream; the guided image output is written into both
  the positive and the NAG row, text outputs stay unguided (``single_stream_attention``). Where the
  model's modulation carries no text (Chroma, and Neo's newer single-stream models), the NAG row's
  image tokens stay equal to its positive row's in every block: their inputs, modulation and guided
  attention output are the same. Then the NAG row is its text tokens alone, and attends with its
  positive row's image q/k/v (``single_stream_text_attention``): the same values, without
  recomputing the image tokens.

Positive text and NAG text are separate tensors (their lengths may differ; nothing is padded). The
host gives its attention as ``attend(q, k, v, pe)``: ``[batch, heads, tokens, head_dim]`` tensors and
the rotary embedding of those tokens (``None`` for a model without one: the MMDiT), heads merged in
the result ``[batch, tokens, heads·head_dim]``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch

from .attention import PositiveRows
from .guidance import nag_combine
from .params import NagParams

Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


class QKV(NamedTuple):
    """Projected queries, keys and values, each ``[batch, heads, tokens, head_dim]``."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    def rows(self, positive: PositiveRows) -> QKV:
        return QKV(*(positive.take(t) for t in self))

    def then(self, following: QKV) -> QKV:
        """These tokens followed by ``following``'s."""
        return QKV(*(torch.cat(pair, dim=2) for pair in zip(self, following, strict=True)))

    def attend(self, attend: Attend, pe: torch.Tensor | None) -> torch.Tensor:
        return attend(self.q, self.k, self.v, pe)


def _guide_image(
    image_out: torch.Tensor,
    image_out_negative: torch.Tensor,
    positive: PositiveRows,
    params: NagParams,
) -> torch.Tensor:
    """Guide the positive rows of ``image_out`` (all rows) in place; return the guided rows."""
    guided = nag_combine(positive.take(image_out), image_out_negative, params.scale, params.tau, params.alpha)
    positive.put(image_out, guided)
    return guided


def double_stream_attention(
    txt: QKV,
    txt_negative: QKV,
    img: QKV,
    positive: PositiveRows,
    pe: torch.Tensor | None,
    pe_negative: torch.Tensor | None,
    attend: Attend,
    params: NagParams,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Joint attention of a double-stream block with NAG.

    ``txt`` and ``img`` hold every row of the batch; ``txt_negative`` one NAG row per positive row,
    in the order of ``positive.rows``. Returns the text attention output of every row, the text
    attention output of the NAG rows, and the image attention output of every row, whose positive
    rows are guided; the other rows are exactly ``attend``'s for the plain batch.
    """
    joint = txt.then(img).attend(attend, pe)
    txt_length = txt.q.shape[2]
    joint_negative = txt_negative.then(img.rows(positive)).attend(attend, pe_negative)
    txt_length_negative = txt_negative.q.shape[2]
    image_out = joint[:, txt_length:]
    _guide_image(image_out, joint_negative[:, txt_length_negative:], positive, params)
    return joint[:, :txt_length], joint_negative[:, :txt_length_negative], image_out


def single_stream_attention(
    qkv: QKV,
    qkv_negative: QKV,
    txt_length: int,
    txt_length_negative: int,
    positive: PositiveRows,
    pe: torch.Tensor,
    pe_negative: torch.Tensor,
    attend: Attend,
    params: NagParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a single-stream block (``[text; image]`` tokens) with NAG.

    ``qkv`` holds every row of the batch, ``qkv_negative`` the NAG rows (one per positive row, text
    of ``txt_length_negative`` tokens). Returns the attention output of every row, whose positive
    rows' image tokens are guided, and that of the NAG rows, whose image tokens carry the same guided
    values (the authors write them into both); text tokens and other rows are ``attend``'s.
    """
    out = qkv.attend(attend, pe)
    out_negative = qkv_negative.attend(attend, pe_negative)
    image_negative = out_negative[:, txt_length_negative:]
    image_negative.copy_(_guide_image(out[:, txt_length:], image_negative, positive, params))
    return out, out_negative


def single_stream_text_attention(
    qkv: QKV,
    txt_negative: QKV,
    txt_length: int,
    text_first: bool,
    positive: PositiveRows,
    pe: torch.Tensor | None,
    pe_negative: torch.Tensor | None,
    attend: Attend,
    params: NagParams,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a single-stream block with NAG, the NAG rows given as their text tokens alone.

    ``qkv`` holds every row of the batch: ``txt_length`` text tokens and the image tokens, text first
    or (``text_first`` false) image first. ``txt_negative`` holds the NAG rows' text tokens (one row per
    positive row); each NAG row attends over them and its positive row's image q/k/v, in the batch's
    token order (``pe_negative`` is that sequence's rotary embedding). Returns the attention output of
    every row, whose positive rows' image tokens are guided, and the NAG rows' text-token output; the
    NAG rows' image output is the guided one, which the positive rows already hold.
    """
    out = qkv.attend(attend, pe)
    image = qkv.rows(positive)
    image = QKV(*(t[:, :, txt_length:] if text_first else t[:, :, : t.shape[2] - txt_length] for t in image))
    nag_rows = txt_negative.then(image) if text_first else image.then(txt_negative)
    out_negative = nag_rows.attend(attend, pe_negative)
    image_tokens, txt_length_negative = image.q.shape[2], txt_negative.q.shape[2]
    if text_first:
        _guide_image(out[:, txt_length:], out_negative[:, txt_length_negative:], positive, params)
        return out, out_negative[:, :txt_length_negative]
    _guide_image(out[:, :image_tokens], out_negative[:, :image_tokens], positive, params)
    return out, out_negative[:, image_tokens:]
