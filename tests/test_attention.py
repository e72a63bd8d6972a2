import pytest
import torch
from ldm.modules.attention import CrossAttention
from reference import reference_attention, reference_guided_rows

from lib_nag.attention import CrossAttentionNag, NegativeKV, PositiveRows, attention, row_offset
from lib_nag.params import NagParams

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)


def cross_attention(query_dim=64, context_dim=96, heads=4):
    return CrossAttention(query_dim, context_dim=context_dim, heads=heads, dim_head=query_dim // heads).eval()


def run(module, x, context, positive, negative, kv=None, params=PARAMS, forward=None):
    """One attention call of ``module`` (its own forward, or ``forward``) with NAG hooked on it."""
    nag = CrossAttentionNag(params, kv if kv is not None else NegativeKV())
    nag.negative = negative
    nag.install([module])
    try:
        nag.begin_call(x, positive)
        out = forward(module, x, context) if forward else module(x, context=context)
        nag.end_call()
        return out
    finally:
        nag.remove()
    assert not module.to_q._forward_hooks and not module.to_out[0]._forward_pre_hooks


def test_no_positive_rows_is_the_stock_forward():
    module = cross_attention()
    x, context, negative = torch.randn(3, 16, 64), torch.randn(3, 77, 96), torch.randn(1, 77, 96)
    stock = module(x, context=context)
    assert torch.equal(run(module, x, context, None, negative), stock)
    assert torch.equal(run(module, x, context, PositiveRows.of([], [], "cpu"), negative), stock)


def test_negative_equal_to_positive_context_is_the_stock_forward(record_difference):
    module = cross_attention()
    x, context = torch.randn(2, 16, 64), torch.randn(2, 77, 96)
    out = run(module, x, context, PositiveRows.of([0, 1], [0, 1], "cpu"), context)
    difference = (out - module(x, context=context)).abs().max().item()
    record_difference(difference)
    assert difference <= 1e-5


@pytest.mark.parametrize("positive_tokens,negative_tokens", [(77, 77), (154, 77), (77, 231), (231, 154)])
def test_positive_rows_match_reference_and_others_are_bit_identical(positive_tokens, negative_tokens, record_difference):
    module = cross_attention()
    # Batch as A1111 lays it out: two cond rows for image 0 (AND), one for image 1, then uncond.
    x = torch.randn(5, 24, 64)
    x[3:] = x[[0, 2]]  # uncond rows see the same latents
    context = torch.randn(5, positive_tokens, 96)
    negative = torch.randn(2, negative_tokens, 96)
    positive = PositiveRows.of([0, 1, 2], [0, 0, 1], "cpu")

    out = run(module, x, context, positive, negative)
    stock = module(x, context=context)
    assert torch.equal(out[3:], stock[3:])
    expected = reference_guided_rows(module, x, context, [0, 1, 2], [negative[0:1], negative[0:1], negative[1:2]], 5.0, 2.5, 0.25)
    difference = (out[:3] - expected).abs().max().item()
    record_difference(difference, f"{positive_tokens}/{negative_tokens} tokens")
    assert difference <= 1e-5
    assert (out[:3] - stock[:3]).abs().max() > 1e-3  # guidance did something


def test_positive_rows_in_any_position():
    module = cross_attention()
    x, context, negative = torch.randn(4, 16, 64), torch.randn(4, 77, 96), torch.randn(1, 77, 96)
    out = run(module, x, context, PositiveRows.of([3, 1], [0, 0], "cpu"), negative)
    stock = module(x, context=context)
    assert torch.equal(out[[0, 2]], stock[[0, 2]])
    expected = reference_guided_rows(module, x, context, [3, 1], [negative, negative], 5.0, 2.5, 0.25)
    torch.testing.assert_close(out[[3, 1]], expected, atol=1e-5, rtol=0)


def test_negative_kv_is_reused_and_follows_weight_edits():
    module = cross_attention()
    x, context, negative = torch.randn(2, 16, 64), torch.randn(2, 77, 96), torch.randn(1, 77, 96)
    positive = PositiveRows.of([0], [0], "cpu")
    kv = NegativeKV()
    projected = []
    module.to_k.register_forward_hook(lambda _m, args, _out: projected.append(args[0].shape[1]))

    first = run(module, x, context, positive, negative, kv)
    second = run(module, x, context, positive, negative, kv)
    assert torch.equal(first, second)
    assert projected == [77, 77, 77]  # K⁻ once, K⁺ by the host forward on each call
    k_cached, _ = kv.get(module, negative, like=x)

    module.to_k.weight.mul_(1.5)  # an in-place edit, as a LoRA applies itself
    third = run(module, x, context, positive, negative, kv)
    k_fresh, _ = kv.get(module, negative, like=x)
    assert not torch.equal(k_fresh, k_cached)
    torch.testing.assert_close(k_fresh, module.to_k(negative))
    expected = reference_guided_rows(module, x, context, [0], [negative], 5.0, 2.5, 0.25)
    torch.testing.assert_close(third[:1], expected, atol=1e-5, rtol=0)

    replacement = negative.clone()  # a new negative context (a prompt-schedule switch)
    run(module, x, context, positive, replacement, kv)
    assert kv.get(module, replacement, like=x)[0] is not k_fresh


def test_a_replace_patch_that_calls_the_projections_is_guided_the_same(record_difference):
    """Forge runs an attn2 replace as to_q/to_k/to_v (module calls) → replace → to_out."""
    module = cross_attention()
    x, context, negative = torch.randn(3, 16, 64), torch.randn(3, 77, 96), torch.randn(2, 77, 96)
    positive = PositiveRows.of([0, 2], [1, 0], "cpu")
    via_module = run(module, x, context, positive, negative)

    def replace_path(self, x, context):
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        return self.to_out(attention(q, k, v, self.heads))

    difference = (run(module, x, context, positive, negative, forward=replace_path) - via_module).abs().max().item()
    record_difference(difference)
    assert difference <= 1e-5


def regional_forward(self, x, context):
    """Shaped like Regional Prompter's attention: for each half of the rows (cond, uncond), each
    region attends to its own token span, with its own to_q…to_out, and the regions are put
    together by a mask over the image tokens."""
    halves = []
    for rows, contexts in zip(x.chunk(2), context.chunk(2), strict=True):
        regions = [self.to_out(attention(self.to_q(rows), self.to_k(c), self.to_v(c), self.heads)) for c in contexts.chunk(2, dim=1)]
        mask = torch.arange(rows.shape[1]) < rows.shape[1] // 2
        halves.append(torch.where(mask[None, :, None], regions[0], regions[1]))
    return torch.cat(halves)


def test_attention_run_per_region_on_row_halves_is_guided_per_region(record_difference):
    module = cross_attention()
    x, context, negative = torch.randn(4, 16, 64), torch.randn(4, 154, 96), torch.randn(2, 77, 96)
    positive = PositiveRows.of([0, 1], [0, 1], "cpu")  # rows 0, 1 cond; 2, 3 uncond
    out = run(module, x, context, positive, negative, forward=regional_forward)
    assert torch.equal(out[2:], regional_forward(module, x, context)[2:])
    mask = torch.arange(16) < 8
    regions = [
        reference_guided_rows(module, x, c, [0, 1], [negative[0:1], negative[1:2]], 5.0, 2.5, 0.25) for c in context.chunk(2, dim=1)
    ]
    expected = torch.where(mask[None, :, None], regions[0], regions[1])
    difference = (out[:2] - expected).abs().max().item()
    record_difference(difference)
    assert difference <= 1e-5


def test_an_instance_forward_installed_before_or_after_is_kept():
    module = cross_attention()
    x, context, negative = torch.randn(2, 16, 64), torch.randn(2, 77, 96), torch.randn(1, 77, 96)
    neighbour = regional_forward.__get__(module)
    plain = regional_forward(module, x, context)
    nag = CrossAttentionNag(PARAMS, NegativeKV())
    nag.negative = negative
    nag.install([module])
    module.forward = lambda x, context=None: neighbour(x, context)  # installed after NAG
    nag.begin_call(x, PositiveRows.of([0], [0], "cpu"))
    guided = module(x, context=context)
    nag.end_call()
    assert nag.guided_calls == 1 and not torch.equal(guided[0], plain[0]) and torch.equal(guided[1], plain[1])
    installed = module.forward
    nag.remove()
    assert module.forward is installed  # never removed or replaced by NAG
    assert torch.equal(module(x, context=context), plain)


def test_queries_that_are_not_a_slice_of_the_call_are_not_guided_and_are_counted():
    module = cross_attention()
    x, context, negative = torch.randn(2, 16, 64), torch.randn(2, 77, 96), torch.randn(1, 77, 96)

    def copying_forward(self, x, context):
        return self.to_out(attention(self.to_q(x.clone()), self.to_k(context), self.to_v(context), self.heads))

    nag = CrossAttentionNag(PARAMS, NegativeKV())
    nag.negative = negative
    nag.install([module])
    nag.begin_call(x, PositiveRows.of([0], [0], "cpu"))
    out = copying_forward(module, x, context)
    nag.end_call()
    nag.remove()
    assert torch.equal(out, copying_forward(module, x, context))
    assert (nag.guided_calls, nag.missed_calls) == (0, 1)


def test_rows_and_offsets():
    base = torch.randn(6, 3, 4)
    assert row_offset(base[2:5], base) == 2 and row_offset(base.chunk(2)[1], base) == 3
    assert row_offset(base[2:5].clone(), base) is None and row_offset(base[:, 1:], base) is None
    positive = PositiveRows.of([0, 1, 2], [0, 0, 1], "cpu")
    assert positive.within(0, 6) is positive
    inner = positive.within(1, 3)
    assert inner.rows.tolist() == [0, 1] and inner.negative_index.tolist() == [0, 1]
    assert positive.within(3, 3) is None
    tiled = PositiveRows.of([0], [1], "cpu").repeated(3, 2)
    assert tiled.rows.tolist() == [0, 2, 4] and tiled.negative_index.tolist() == [1, 1, 1]


def test_attention_matches_softmax_reference(record_difference):
    q, k, v = torch.randn(2, 10, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    difference = (attention(q, k, v, 4) - reference_attention(q, k, v, 4)).abs().max().item()
    record_difference(difference)
    assert difference <= 1e-6


def test_plain_fallback_matches_sdpa(monkeypatch):
    import lib_nag.attention as module

    q, k, v = torch.randn(2, 10, 32), torch.randn(2, 7, 32), torch.randn(2, 7, 32)
    with_sdpa = attention(q, k, v, 4)
    monkeypatch.setattr(module, "_sdpa", module._plain_attention)
    torch.testing.assert_close(attention(q, k, v, 4), with_sdpa, atol=1e-6, rtol=0)


def test_hooks_are_removed_even_when_the_forward_raises():
    module = cross_attention()
    x, context, negative = torch.randn(1, 16, 64), torch.randn(1, 77, 96), torch.randn(1, 77, 96)

    def broken_forward(self, x, context=None, **kwargs):
        self.to_q(x)
        raise RuntimeError("host failure")

    with pytest.raises(RuntimeError, match="host failure"):
        run(module, x, context, PositiveRows.of([0], [0], "cpu"), negative, forward=broken_forward)
    assert not module.to_q._forward_hooks and not module.to_out[0]._forward_pre_hooks


def _host_attention_core(self, x, context):
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    return attention(q, k, v, self.heads)


def sdp_shaped_forward(self, x, context=None, mask=None, **kwargs):
    """Shaped like A1111's scaled_dot_product_attention_forward: it calls to_out[0], then to_out[1]."""
    return self.to_out[1](self.to_out[0](_host_attention_core(self, x, context)))


def sub_quad_shaped_forward(self, x, context=None, mask=None, **kwargs):
    """Shaped like A1111's sub_quad_attention_forward: it unpacks to_out and calls its parts."""
    out_proj, dropout = self.to_out
    return dropout(out_proj(_host_attention_core(self, x, context)))


def sequential_shaped_forward(self, x, context=None, mask=None, **kwargs):
    """Shaped like A1111's xformers / Doggettx / InvokeAI forwards and sgm's: it calls to_out."""
    return self.to_out(_host_attention_core(self, x, context))


@pytest.mark.parametrize("forward", [sdp_shaped_forward, sub_quad_shaped_forward, sequential_shaped_forward])
def test_every_host_attention_forward_shape_is_guided(forward, record_difference):
    module = cross_attention()
    x, context, negative = torch.randn(3, 16, 64), torch.randn(3, 77, 96), torch.randn(1, 77, 96)
    positive = PositiveRows.of([0, 1], [0, 0], "cpu")
    out = run(module, x, context, positive, negative, forward=forward)
    assert torch.equal(out[2], forward(module, x, context)[2])
    expected = reference_guided_rows(module, x, context, [0, 1], [negative, negative], 5.0, 2.5, 0.25)
    difference = (out[:2] - expected).abs().max().item()
    record_difference(difference, forward.__name__)
    assert difference <= 1e-5
