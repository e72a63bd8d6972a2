"""The NAG cross-attention, shared by every host.

The host computes its own attention for every row; NAG then replaces the pre-out-projection
output of the positive rows only. Rows that are not positive therefore keep exactly what the
host computes, and the positive rows' ``Z⁺`` is the host's own attention output.

- A1111 (``nag_cross_attention``): the host's attention forward runs unchanged; a hook on
  ``to_q`` keeps the positive rows' queries and a pre-hook on the out-projection guides them.
- Forge family (``nag_attention``): the attn2 replace patch gets projected q/k/v and returns
  the output before ``to_out``, so the host attention function runs and the same
  ``guide_rows`` follows.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .guidance import nag_combine
from .params import NagParams

AttentionFunction = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


def _split_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    batch, tokens, inner = t.shape
    return t.view(batch, tokens, heads, inner // heads).transpose(1, 2)


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    scores = (q.float() @ k.float().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return (scores.softmax(dim=-1) @ v.float()).to(v.dtype)


_sdpa = getattr(F, "scaled_dot_product_attention", None) or _plain_attention


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax attention on ``[batch, tokens, heads·head_dim]`` tensors, heads merged back."""
    out = _sdpa(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    batch, _, tokens, _ = out.shape
    return out.transpose(1, 2).reshape(batch, tokens, q.shape[-1])


def _span(indices: list[int]) -> slice | None:
    """``indices`` as a slice when they are consecutive (the usual layouts), so rows are views."""
    if indices and indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return None


@dataclass(frozen=True)
class PositiveRows:
    """Rows of one attention call that carry a positive prompt.

    ``rows[i]`` is a row of the call's batch; ``negative_index[i]`` is the row of the
    NAG-negative context that row is guided away from. Consecutive indices are kept as slices,
    so the usual layouts read and write rows as views instead of gathered copies.
    """

    rows: torch.Tensor
    negative_index: torch.Tensor
    row_span: slice | None = None
    negative_span: slice | None = None

    @classmethod
    def of(cls, rows: list[int], negative_index: list[int], device: torch.device | str) -> PositiveRows:
        return cls(
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(negative_index, dtype=torch.long, device=device),
            _span(rows),
            _span(negative_index),
        )

    def __len__(self) -> int:
        return self.rows.numel()

    def take(self, batch: torch.Tensor) -> torch.Tensor:
        """The positive rows of ``batch`` (a view when they are consecutive)."""
        return batch[self.row_span] if self.row_span else batch.index_select(0, self.rows)

    def put(self, batch: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Write ``rows`` into the positive rows of ``batch``, in place."""
        if self.row_span:
            batch[self.row_span] = rows
            return batch
        return batch.index_copy_(0, self.rows, rows)

    def negatives(self, negative: torch.Tensor) -> torch.Tensor:
        """The NAG-negative row of each positive row."""
        return negative[self.negative_span] if self.negative_span else negative[self.negative_index]


def _version(t: torch.Tensor) -> int:
    # Inference-mode tensors keep no version counter; their identity still counts.
    return -1 if t.is_inference() else t._version


def _weights_state(module: torch.nn.Module) -> tuple:
    params = [*module.to_k.parameters(), *module.to_v.parameters()]
    return tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in params)


@dataclass
class _KVEntry:
    context: torch.Tensor
    dtype: torch.dtype
    weights: tuple
    k: torch.Tensor
    v: torch.Tensor


class NegativeKV:
    """K⁻/V⁻ of the NAG-negative context, projected by each module's current weights.

    An entry is reused while the same context tensor is asked for in the same dtype and the
    module's ``to_k``/``to_v`` parameters are the same tensors, unedited (a LoRA that edits
    them in place, or replaces them, invalidates it).
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[torch.nn.Module, _KVEntry] = weakref.WeakKeyDictionary()

    def get(self, module: torch.nn.Module, context: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        weights = _weights_state(module)
        entry = self._entries.get(module)
        if entry is None or entry.context is not context or entry.dtype != like.dtype or entry.weights != weights:
            projected = context.to(device=like.device, dtype=like.dtype)
            entry = _KVEntry(context, like.dtype, weights, module.to_k(projected), module.to_v(projected))
            self._entries[module] = entry
        return entry.k, entry.v


def guide_rows(
    z: torch.Tensor,
    q_positive: torch.Tensor,
    positive: PositiveRows,
    k_negative: torch.Tensor,
    v_negative: torch.Tensor,
    heads: int,
    params: NagParams,
) -> torch.Tensor:
    """Guide the positive rows of ``z`` (pre-out-projection, all rows) in place and return it.

    ``q_positive`` holds the positive rows' queries; the negative branch attends with them
    over the K⁻/V⁻ row each one is mapped to. Other rows are left untouched.
    """
    z_negative = attention(q_positive, positive.negatives(k_negative), positive.negatives(v_negative), heads)
    guided = nag_combine(positive.take(z), z_negative, params.scale, params.tau, params.alpha)
    return positive.put(z, guided)


def out_projection(module: torch.nn.Module) -> torch.nn.Module:
    """The out-projection Linear: A1111's sdp and sub-quadratic forwards call ``to_out[0]``
    directly rather than the ``to_out`` Sequential, so the hook goes on the Linear."""
    return module.to_out[0] if isinstance(module.to_out, torch.nn.Sequential) else module.to_out


def nag_cross_attention(
    module: torch.nn.Module,
    x: torch.Tensor,
    context: torch.Tensor | None,
    positive: PositiveRows | None,
    negative_context: torch.Tensor,
    negative_kv: NegativeKV,
    params: NagParams,
    forward: Callable[..., torch.Tensor] | None = None,
    **kwargs: Any,
) -> torch.Tensor:
    """Run an attention module with NAG on its positive rows.

    ``forward`` is the host's forward for the module's class (default: ``type(module).forward``,
    resolved now so a change of attention optimization is honoured). Rows outside
    ``positive`` get exactly that forward's output; positive rows get
    ``to_out(NAG(attention(q, K⁺, V⁺), attention(q, K⁻, V⁻)))`` where the first attention is
    the host's own and ``q`` its own query projection, computed once.
    """
    forward = forward or type(module).forward
    if positive is None or len(positive) == 0:
        return forward(module, x, context=context, **kwargs)

    queries: list[torch.Tensor] = []

    def keep_positive_queries(_module: torch.nn.Module, _args: tuple, q: torch.Tensor) -> None:
        # A copy: the host's forward owns q and may reuse its memory.
        queries.append(q[positive.row_span].clone() if positive.row_span else q.index_select(0, positive.rows))

    def guide_before_out_projection(_module: torch.nn.Module, args: tuple) -> tuple:
        (z, *rest) = args
        k_negative, v_negative = negative_kv.get(module, negative_context, like=z)
        return (guide_rows(z, queries.pop(), positive, k_negative, v_negative, module.heads, params), *rest)

    query_hook = module.to_q.register_forward_hook(keep_positive_queries)
    out_hook = out_projection(module).register_forward_pre_hook(guide_before_out_projection)
    try:
        return forward(module, x, context=context, **kwargs)
    finally:
        query_hook.remove()
        out_hook.remove()


def nag_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    heads: int,
    positive: PositiveRows | None,
    k_negative: torch.Tensor,
    v_negative: torch.Tensor,
    params: NagParams,
    host_attention: AttentionFunction = attention,
) -> torch.Tensor:
    """The same NAG in the shape of an attn2 replace: projected q/k/v in, pre-``to_out`` out.

    ``host_attention(q, k, v, heads)`` computes every row as the host would; the positive
    rows are then guided exactly as in ``nag_cross_attention``.
    """
    z = host_attention(q, k, v, heads)
    if positive is None or len(positive) == 0:
        return z
    return guide_rows(z, positive.take(q), positive, k_negative, v_negative, heads, params)
