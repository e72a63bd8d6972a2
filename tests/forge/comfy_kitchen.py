"""Stand-in of ``comfy_kitchen`` (Comfy-Org/comfy-kitchen, Apache-2.0), the RoPE functions Forge Neo's
models import, as its eager backend behaves (``comfy_kitchen/backends/eager/rope.py``); written from
that behaviour. ``freqs_cis`` holds a 2×2 matrix per rotated pair: ``[..., pairs, 2, 2]``.

- ``apply_rope1``: pairs of adjacent channels ``(x[2i], x[2i+1])``, the Flux layout;
- ``apply_rope_split_half1``: pairs of channels half the head apart ``(x[i], x[i + D/2])``, the layout
  ERNIE-Image's tables are built for. Both compute in the tables' dtype and return x's."""

import torch


def apply_rope1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]).reshape(x.shape).type_as(x)


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope1(xq, freqs_cis), apply_rope1(xk, freqs_cis)


def apply_rope_split_half1(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    halves = x.reshape(*x.shape[:-1], 2, -1).movedim(-2, -1).unsqueeze(-2).to(freqs_cis.dtype)  # [..., D/2, 1, 2]
    rotated = freqs_cis[..., 0] * halves[..., 0] + freqs_cis[..., 1] * halves[..., 1]  # [..., D/2, 2]
    return rotated.movedim(-1, -2).reshape(x.shape).type_as(x)


def apply_rope_split_half(xq: torch.Tensor, xk: torch.Tensor, freqs_cis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return apply_rope_split_half1(xq, freqs_cis), apply_rope_split_half1(xk, freqs_cis)
