import pytest
import torch
from reference import reference_nag

from lib_nag.guidance import nag_combine

TOLERANCE = {torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def pair(dtype, rows=3, tokens=5, channels=64):
    z_positive = torch.randn(rows, tokens, channels).to(dtype)
    z_negative = (z_positive.float() + 0.7 * torch.randn(rows, tokens, channels)).to(dtype)
    return z_positive, z_negative


def relative_error(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("scale,tau,alpha", [(5.0, 2.5, 0.25), (3.0, 2.5, 0.5), (11.0, 3.5, 0.5), (2.0, 1.0, 1.0)])
def test_matches_published_formula(dtype, scale, tau, alpha, record_difference):
    z_positive, z_negative = pair(dtype)
    out = nag_combine(z_positive, z_negative, scale, tau, alpha)
    assert out.dtype == dtype
    # The reference sees the same (rounded) inputs; the difference is the output rounding.
    error = relative_error(out, reference_nag(z_positive, z_negative, scale, tau, alpha))
    record_difference(error, str(dtype))
    assert error <= TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_no_guidance_gives_the_positive_back(dtype):
    z_positive, z_negative = pair(dtype)
    assert torch.equal(nag_combine(z_positive, z_negative, 1.0, 2.5, 0.5), z_positive)
    assert torch.equal(nag_combine(z_positive, z_negative, 5.0, 2.5, 0.0), z_positive)


def test_tau_caps_the_l1_norm_and_never_raises_it():
    z_positive, z_negative = pair(torch.float32, rows=4, tokens=16)
    z_negative[:, ::2] = z_positive[:, ::2] + 0.01 * torch.randn_like(z_positive[:, ::2])  # stays under the cap
    tau = 1.5
    guided = nag_combine(z_positive, z_negative, 9.0, tau, alpha=1.0)
    norm_positive = z_positive.abs().sum(-1)
    norm_guided = guided.abs().sum(-1)
    assert torch.all(norm_guided <= tau * norm_positive * (1 + 1e-5))
    unguided = z_positive * 9.0 - z_negative * 8.0
    capped = unguided.abs().sum(-1) > tau * norm_positive
    assert capped.any() and (~capped).any()
    torch.testing.assert_close(norm_guided[capped], tau * norm_positive[capped])
    torch.testing.assert_close(guided[~capped], unguided[~capped])


@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_zero_norm_tokens_give_the_positive_back_without_nan(dtype):
    z_positive, z_negative = pair(dtype, rows=1, tokens=4)
    z_positive[0, 0] = 0  # ‖Z⁺‖₁ = 0, ‖Z̃‖₁ > 0
    z_positive[0, 1] = 0
    z_negative[0, 1] = 0  # both zero
    z_negative[0, 2] = z_positive[0, 2]  # Z̃ = Z⁺
    out = nag_combine(z_positive, z_negative, 5.0, 2.5, 0.25)
    assert torch.isfinite(out).all()
    assert torch.equal(out[0, :2], z_positive[0, :2])
    torch.testing.assert_close(out[0, 2], z_positive[0, 2])


def test_rows_and_tokens_are_independent():
    z_positive, z_negative = pair(torch.float32, rows=4, tokens=6)
    whole = nag_combine(z_positive, z_negative, 5.0, 2.5, 0.25)
    altered_negative = z_negative.clone()
    altered_negative[1:] = torch.randn_like(altered_negative[1:]) * 100
    altered = nag_combine(z_positive, altered_negative, 5.0, 2.5, 0.25)
    assert torch.equal(whole[0], altered[0])
    assert not torch.equal(whole[1], altered[1])
    single = nag_combine(z_positive[2:3, 3:4], z_negative[2:3, 3:4], 5.0, 2.5, 0.25)
    assert torch.equal(single[0, 0], whole[2, 3])
