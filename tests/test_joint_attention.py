"""The joint-attention NAG core (lib_nag.joint_attention) on random q/k/v with Forge's RoPE attention
(stand-in), against the float64 NAG reference."""

import pytest
import torch
from backend.nn.flux import EmbedND, attention
from reference import reference_nag

from lib_nag.attention import PositiveRows
from lib_nag.joint_attention import QKV, double_stream_attention, single_stream_attention, single_stream_text_attention
from lib_nag.params import NagParams

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
HEADS, HEAD_DIM, IMAGE_TOKENS = 2, 16, 6
ROPE = EmbedND(dim=HEAD_DIM, theta=10000, axes_dim=[4, 6, 6])


def rope(rows, txt_tokens):
    ids = torch.cat([torch.zeros(rows, txt_tokens, 3), torch.randint(0, 4, (1, IMAGE_TOKENS, 3)).float().expand(rows, -1, -1)], dim=1)
    return ROPE(ids)


def qkv(rows, tokens):
    return QKV(*(torch.randn(rows, HEADS, tokens, HEAD_DIM) for _ in range(3)))


def relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# rows 0..2 of a 3-row batch; positive rows as slices (consecutive) or gathered (in any order)
LAYOUTS = {"last rows": [1, 2], "one row": [0], "scattered, reversed": [2, 0]}


@pytest.mark.parametrize("rows", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_double_stream_guides_only_the_positive_image_rows(rows, record_difference):
    positive = PositiveRows.of(rows, list(range(len(rows))), "cpu")
    txt, img, txt_negative = qkv(3, 5), qkv(3, IMAGE_TOKENS), qkv(len(rows), 4)  # NAG text shorter than the prompt
    pe, pe_negative = rope(3, 5), rope(len(rows), 4)
    txt_out, txt_negative_out, img_out = double_stream_attention(txt, txt_negative, img, positive, pe, pe_negative, attention, PARAMS)

    plain = attention(*txt.then(img), pe)
    negative = attention(*txt_negative.then(img.rows(positive)), pe_negative)
    assert torch.equal(txt_out, plain[:, :5])
    assert torch.equal(txt_negative_out, negative[:, :4])
    others = [r for r in range(3) if r not in rows]
    assert torch.equal(img_out[others], plain[others, 5:])
    expected = reference_nag(plain[rows, 5:], negative[:, 4:], PARAMS.scale, PARAMS.tau, PARAMS.alpha)
    record_difference(relative(img_out[rows], expected))
    assert relative(img_out[rows], expected) <= 1e-5
    assert relative(img_out[rows], plain[rows, 5:]) > 1e-2  # guidance did something


@pytest.mark.parametrize("rows", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_single_stream_writes_the_guided_image_output_into_both_branches(rows, record_difference):
    positive = PositiveRows.of(rows, list(range(len(rows))), "cpu")
    batch, nag_rows = qkv(3, 5 + IMAGE_TOKENS), qkv(len(rows), 7 + IMAGE_TOKENS)  # NAG text longer than the prompt
    pe, pe_negative = rope(3, 5), rope(len(rows), 7)
    out, out_negative = single_stream_attention(batch, nag_rows, 5, 7, positive, pe, pe_negative, attention, PARAMS)

    plain, negative = attention(*batch, pe), attention(*nag_rows, pe_negative)
    others = [r for r in range(3) if r not in rows]
    assert torch.equal(out[others], plain[others])
    assert torch.equal(out[:, :5], plain[:, :5])
    assert torch.equal(out_negative[:, :7], negative[:, :7])
    assert torch.equal(out_negative[:, 7:], out[rows, 5:])
    expected = reference_nag(plain[rows, 5:], negative[:, 7:], PARAMS.scale, PARAMS.tau, PARAMS.alpha)
    record_difference(relative(out[rows, 5:], expected))
    assert relative(out[rows, 5:], expected) <= 1e-5


def test_nag_text_equal_to_the_prompt_leaves_the_attention_unchanged():
    positive = PositiveRows.of([0, 1], [0, 1], "cpu")
    txt, img = qkv(2, 5), qkv(2, IMAGE_TOKENS)
    pe = rope(2, 5)
    _, _, img_out = double_stream_attention(txt, txt, img, positive, pe, pe, attention, PARAMS)
    torch.testing.assert_close(img_out, attention(*txt.then(img), pe)[:, 5:], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("text_first", [True, False], ids=["text first", "image first"])
@pytest.mark.parametrize("rows", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_single_stream_with_nag_text_alone_equals_the_full_nag_stream(rows, text_first, record_difference):
    """When the NAG rows' image tokens are their positive rows' (modulation without text), NAG rows given
    as their text alone get what full NAG rows get: the same guided image, the same NAG text output."""
    positive = PositiveRows.of(rows, list(range(len(rows))), "cpu")
    txt, img, txt_negative = qkv(3, 5), qkv(3, IMAGE_TOKENS), qkv(len(rows), 7)
    image_ids = torch.randint(0, 4, (1, IMAGE_TOKENS, 3)).float()

    def in_order(text, image):
        return text.then(image) if text_first else image.then(text)

    def pe_of(rows, txt_tokens):
        text_ids, ids = torch.zeros(rows, txt_tokens, 3), image_ids.expand(rows, -1, -1)
        return ROPE(torch.cat((text_ids, ids) if text_first else (ids, text_ids), dim=1))

    batch, full_nag_rows = in_order(txt, img), in_order(txt_negative, img.rows(positive))
    pe, pe_negative = pe_of(3, 5), pe_of(len(rows), 7)
    out, out_txt_negative = single_stream_text_attention(batch, txt_negative, 5, text_first, positive, pe, pe_negative, attention, PARAMS)

    plain, negative = attention(*batch, pe), attention(*full_nag_rows, pe_negative)
    text, image = (slice(0, 5), slice(5, None)) if text_first else (slice(IMAGE_TOKENS, None), slice(0, IMAGE_TOKENS))
    text_negative, image_negative = (slice(0, 7), slice(7, None)) if text_first else (slice(IMAGE_TOKENS, None), image)
    others = [r for r in range(3) if r not in rows]
    assert torch.equal(out[others], plain[others])
    assert torch.equal(out[:, text], plain[:, text])
    assert torch.equal(out_txt_negative, negative[:, text_negative])
    expected = reference_nag(plain[rows, image], negative[:, image_negative], PARAMS.scale, PARAMS.tau, PARAMS.alpha)
    record_difference(relative(out[rows, image], expected))
    assert relative(out[rows, image], expected) <= 1e-5
    assert relative(out[rows, image], plain[rows, image]) > 1e-2
    if text_first:  # the full NAG stream gives the same, bit for bit
        full, full_negative = single_stream_attention(batch, full_nag_rows, 5, 7, positive, pe, pe_negative, attention, PARAMS)
        assert torch.equal(out, full)
        assert torch.equal(out_txt_negative, full_negative[:, :7])
