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

A layer is described by a ``CrossAttentionLayer``: the UNet's (``to_q``/``to_k``/``to_v``/``to_out``,
``heads``) by default; a model family with other names, a q-norm, its own K/V projection or attention
function describes its layers itself (Wan, Anima).
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
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


def weights_state(modules: Sequence[torch.nn.Module]) -> tuple:
    """What identifies the current weights of ``modules``: each parameter's storage, version, dtype
    and device (a LoRA that edits them in place, or replaces them, changes it)."""
    params = [p for module in modules for p in module.parameters()]
    return tuple((p.data_ptr(), _version(p), p.dtype, p.device) for p in params)


def out_projection(module: torch.nn.Module) -> torch.nn.Module:
    """The out-projection Linear: A1111's sdp and sub-quadratic forwards call ``to_out[0]``
    directly rather than the ``to_out`` Sequential, so the hook goes on the Linear."""
    return module.to_out[0] if isinstance(module.to_out, torch.nn.Sequential) else module.to_out


Transform = Callable[[torch.Tensor], torch.Tensor]
# The text part of the positive rows' pre-out-projection output: (their queries, the rows, the call's rows).
TextPart = Callable[[torch.Tensor, PositiveRows, int], torch.Tensor | None]


@dataclass(frozen=True, eq=False)
class CrossAttentionLayer:
    """How NAG reaches one cross-attention layer (``module``).

    - ``query``: the module whose output is the query projection (a forward hook keeps the positive
      rows'); ``query_norm``, if any, is applied to those rows (the layer's own q-norm).
    - ``out``: the out-projection (a forward pre-hook guides its input, ``Z⁺``).
    - ``heads``; ``attend(q, k, v, heads)`` computes ``Z⁻`` on ``[B, L, heads·head_dim]`` tensors.
    - ``project(context)``: K⁻ and V⁻ of the NAG-negative context, by the layer's own modules; the
      parameters of ``projections`` key the K⁻/V⁻ cache.
    - ``text_part``: only where the out-projection's input is the text attention plus something else
      (Wan i2v's image attention): the positive rows' text attention, recomputed; only that part is
      guided, the rest stays as the host computed it. None: the input is the text attention.
    """

    module: torch.nn.Module
    query: torch.nn.Module
    out: torch.nn.Module
    heads: int
    project: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
    projections: tuple[torch.nn.Module, ...]
    query_norm: Transform | None = None
    attend: AttentionFunction = attention
    text_part: TextPart | None = None

    @classmethod
    def of(cls, module: torch.nn.Module | CrossAttentionLayer) -> CrossAttentionLayer:
        """A layer as given, or a UNet cross-attention module (``to_q``, ``to_k``, ``to_v``,
        ``to_out``, ``heads``: ldm's and Forge's ``CrossAttention``)."""
        if isinstance(module, CrossAttentionLayer):
            return module

        def project(context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return module.to_k(context), module.to_v(context)

        return cls(module, module.to_q, out_projection(module), module.heads, project, (module.to_k, module.to_v))


@dataclass
class _KVEntry:
    context: torch.Tensor
    dtype: torch.dtype
    weights: tuple
    k: torch.Tensor
    v: torch.Tensor


class NegativeKV:
    """K⁻/V⁻ of the NAG-negative context, projected by each layer's current weights.

    An entry is reused while the same context tensor is asked for in the same dtype and the
    layer's projection parameters (``to_k``/``to_v`` on the UNet) are the same tensors, unedited
    (a LoRA that edits them in place, or replaces them, invalidates it).
    """

    def __init__(self) -> None:
        self._entries: weakref.WeakKeyDictionary[torch.nn.Module, _KVEntry] = weakref.WeakKeyDictionary()

    def get(
        self, layer: torch.nn.Module | CrossAttentionLayer, context: torch.Tensor, like: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        layer = CrossAttentionLayer.of(layer)
        weights = weights_state(layer.projections)
        entry = self._entries.get(layer.module)
        if entry is None or entry.context is not context or entry.dtype != like.dtype or entry.weights != weights:
            entry = _KVEntry(context, like.dtype, weights, *layer.project(context.to(device=like.device, dtype=like.dtype)))
            self._entries[layer.module] = entry
        return entry.k, entry.v


def guide_rows(
    z: torch.Tensor,
    q_positive: torch.Tensor,
    positive: PositiveRows,
    k_negative: torch.Tensor,
    v_negative: torch.Tensor,
    heads: int,
    params: NagParams,
    attend: AttentionFunction = attention,
    text: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guide the positive rows of ``z`` (pre-out-projection, all rows) in place and return it.

    ``q_positive`` holds the positive rows' queries; the negative branch attends with them
    over the K⁻/V⁻ row each one is mapped to. Other rows are left untouched. With ``text`` (the
    positive rows' text attention, where ``z`` holds it plus another attention) only that part is
    guided: ``z⁺ + NAG(text, Z⁻) − text``.
    """
    z_negative = attend(q_positive, positive.negatives(k_negative), positive.negatives(v_negative), heads)
    if text is None:
        guided = nag_combine(positive.take(z), z_negative, params.scale, params.tau, params.alpha)
    else:
        change = nag_combine(text, z_negative, params.scale, params.tau, params.alpha).float() - text.float()
        guided = (positive.take(z).float() + change).to(z.dtype)
    return positive.put(z, guided)


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

    def install(self, layers: Sequence[torch.nn.Module | CrossAttentionLayer]) -> None:
        """Hook each layer: a UNet cross-attention module, or a ``CrossAttentionLayer``."""
        for layer in map(CrossAttentionLayer.of, layers):
            waiting: list[_Queries] = []  # this layer's latest positive queries, one at most
            self._handles.append(layer.query.register_forward_hook(partial(self._keep_queries, layer, waiting)))
            self._handles.append(layer.out.register_forward_pre_hook(partial(self._guide, layer, waiting)))

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

    def _keep_queries(
        self, layer: CrossAttentionLayer, waiting: list[_Queries], _linear: torch.nn.Module, args: tuple, q: torch.Tensor
    ) -> None:
        waiting.clear()
        call = self._call
        if call is None or self.negative is None or not args:
            return
        offset = row_offset(args[0], call.x)  # the whole call, or a row slice of it
        positive = None if offset is None else call.positive.within(offset, args[0].shape[0])
        if positive is not None:
            # A copy: the attention code owns q and may reuse its memory.
            queries = q[positive.row_span].clone() if positive.row_span else q.index_select(0, positive.rows)
            if layer.query_norm is not None:
                queries = layer.query_norm(queries)
            waiting.append(_Queries(q.shape[0], positive, queries))

    def _guide(self, layer: CrossAttentionLayer, waiting: list[_Queries], _linear: torch.nn.Module, args: tuple) -> tuple | None:
        if not waiting:
            return None
        queries = waiting.pop()
        (z, *rest) = args
        if z.dim() != 3 or z.shape[0] != queries.rows:
            return None
        text = None if layer.text_part is None else layer.text_part(queries.q, queries.positive, queries.rows)
        if layer.text_part is not None and text is None:
            return None
        k_negative, v_negative = self.kv.get(layer, self.negative, like=z)
        guided = guide_rows(z, queries.q, queries.positive, k_negative, v_negative, layer.heads, self.params, layer.attend, text)
        if not self._call_guided:
            self._call_guided = True
            self.guided_calls += 1
        return (guided, *rest)
