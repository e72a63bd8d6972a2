"""The NAG cross-attention, shared by every host.

Whatever computes a cross-attention module's attention (the host's forward, another extension's
instance ``forward`` such as Regional Prompter's or ControlNet IP-Adapter's, a Forge replace patch)
calls the module's ``to_q`` and out-projection as modules. NAG hooks those two (``CrossAttentionNag``):
a forward hook on ``to_q`` keeps the positive rows' queries, and a pre-hook on the out-projection
replaces the positive rows' output before it with the guided one. So NAG chains to whatever is
installed, in any order: ``Z⁺`` is what that code computes before the out-projection, rows that are
not positive keep exactly its output, and nothing NAG did not install is ever replaced or removed.

The host says which rows of each attention call are positive (``begin_call``), from its batch
layout; the hooks then also follow code that runs the attention on row slices of the call (Regional
Prompter's cond/uncond halves, several times per call for its regions).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

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
    # The same indices on the host: reading them back from a GPU tensor would wait for the device.
    row_list: tuple[int, ...] = ()
    negative_list: tuple[int, ...] = ()

    @classmethod
    def of(cls, rows: list[int], negative_index: list[int], device: torch.device | str) -> PositiveRows:
        return cls(
            torch.tensor(rows, dtype=torch.long, device=device),
            torch.tensor(negative_index, dtype=torch.long, device=device),
            _span(rows),
            _span(negative_index),
            tuple(rows),
            tuple(negative_index),
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

    def within(self, first: int, count: int) -> PositiveRows | None:
        """The positive rows among rows ``first … first+count−1``, numbered from ``first``."""
        rows, negatives = self.row_list, self.negative_list
        kept = [(r - first, n) for r, n in zip(rows, negatives, strict=True) if first <= r < first + count]
        if not kept:
            return None
        if first == 0 and len(kept) == len(rows):
            return self
        return PositiveRows.of([r for r, _ in kept], [n for _, n in kept], self.rows.device)

    def repeated(self, times: int, period: int) -> PositiveRows:
        """The same rows in each of ``times`` consecutive copies of a ``period``-row batch (the
        tile-major batches of tiled-diffusion extensions)."""
        rows, negatives = self.row_list, list(self.negative_list)
        return PositiveRows.of([t * period + r for t in range(times) for r in rows], negatives * times, self.rows.device)


def repeats_with_period(t: torch.Tensor, period: int) -> bool:
    """Whether ``t`` is whole copies of its first ``period`` rows, one after another (how tiled
    diffusion batches its tiles: every tile carries all the rows of the call it tiles)."""
    times, remainder = divmod(t.shape[0], period)
    if remainder or not times:
        return False
    first = t[:period].unsqueeze(0)
    return torch.equal(t.unflatten(0, (times, period)), first.expand(times, *first.shape[1:]))


def row_offset(x: torch.Tensor, base: torch.Tensor) -> int | None:
    """The first row of ``base`` that ``x`` starts at, if ``x`` is a row slice (a view) of ``base``."""
    if x.dim() != base.dim() or x.shape[1:] != base.shape[1:] or x.stride() != base.stride() or x.shape[0] > base.shape[0]:
        return None
    if x.untyped_storage().data_ptr() != base.untyped_storage().data_ptr():
        return None
    rows, remainder = divmod(x.storage_offset() - base.storage_offset(), base.stride(0))
    return rows if remainder == 0 and 0 <= rows <= base.shape[0] - x.shape[0] else None


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


@dataclass
class _Call:
    """The attention call running now: its input rows and which of them are positive."""

    x: torch.Tensor
    positive: PositiveRows


@dataclass
class _Queries:
    """A ``to_q`` output waiting for its out-projection: the positive rows among the rows it was
    computed for, and their queries."""

    rows: int
    positive: PositiveRows
    q: torch.Tensor


class CrossAttentionNag:
    """NAG on a set of cross-attention modules, through hooks on their ``to_q`` and out-projection
    (see the module docstring). ``negative`` is the NAG-negative context, one row per image;
    ``guided_calls`` counts the attention calls in which NAG guided at least one output, and
    ``missed_calls`` those with positive rows that no hooked projection ever saw (the code that ran
    the attention gave ``to_q`` rows that are not a slice of the call's)."""

    def __init__(self, params: NagParams, negative_kv: NegativeKV) -> None:
        self.params = params
        self.kv = negative_kv
        self.negative: torch.Tensor | None = None
        self.guided_calls = 0
        self.missed_calls = 0
        self._call: _Call | None = None
        self._call_guided = False
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def install(self, modules: list[torch.nn.Module]) -> None:
        for module in modules:
            waiting: list[_Queries] = []  # this module's latest positive queries, one at most
            self._handles.append(module.to_q.register_forward_hook(partial(self._keep_queries, waiting)))
            self._handles.append(out_projection(module).register_forward_pre_hook(partial(self._guide, module, waiting)))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self.end_call()

    def begin_call(self, x: torch.Tensor | None, positive: PositiveRows | None) -> None:
        """An attention call over ``x`` starts; guide its ``positive`` rows (None: none)."""
        self.end_call()
        self._call = _Call(x, positive) if x is not None and positive is not None and len(positive) else None
        self._call_guided = False

    def end_call(self) -> None:
        if self._call is not None and not self._call_guided:
            self.missed_calls += 1
        self._call = None

    def _keep_queries(self, waiting: list[_Queries], _linear: torch.nn.Module, args: tuple, q: torch.Tensor) -> None:
        waiting.clear()
        call = self._call
        if call is None or self.negative is None or not args:
            return
        offset = row_offset(args[0], call.x)  # the whole call, or a row slice of it
        positive = None if offset is None else call.positive.within(offset, args[0].shape[0])
        if positive is not None:
            # A copy: the attention code owns q and may reuse its memory.
            queries = q[positive.row_span].clone() if positive.row_span else q.index_select(0, positive.rows)
            waiting.append(_Queries(q.shape[0], positive, queries))

    def _guide(self, module: torch.nn.Module, waiting: list[_Queries], _linear: torch.nn.Module, args: tuple) -> tuple | None:
        if not waiting:
            return None
        queries = waiting.pop()
        (z, *rest) = args
        if z.dim() != 3 or z.shape[0] != queries.rows:
            return None
        k_negative, v_negative = self.kv.get(module, self.negative, like=z)
        guided = guide_rows(z, queries.q, queries.positive, k_negative, v_negative, module.heads, self.params)
        if not self._call_guided:
            self._call_guided = True
            self.guided_calls += 1
        return (guided, *rest)
