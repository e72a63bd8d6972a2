"""Tiny real ldm UNets run end to end with NAG on every attn2."""

import pytest
import torch
from reference import reference_guided_rows
from unets import SDXL_ADM_CHANNELS, attn2_modules, randomize_outputs, sd1_like_unet, sdxl_like_unet

from lib_nag.attention import CrossAttentionNag, NegativeKV, PositiveRows
from lib_nag.params import NagParams

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
ROWS = [0, 1]  # cond rows of two images; rows 2 and 3 are their uncond
NEGATIVE_INDEX = [1, 0]


def wrap_attn2(unet, make_forward):
    for module in attn2_modules(unet).values():
        module.forward = make_forward(module)


def unwrap_attn2(unet):
    for module in attn2_modules(unet).values():
        del module.forward


def hook_nag(unet, negative):
    """NAG on every attn2, each call announcing the same positive rows; returns the handles."""
    positive = PositiveRows.of(ROWS, NEGATIVE_INDEX, "cpu")
    nag = CrossAttentionNag(PARAMS, NegativeKV())
    nag.negative = negative
    modules = list(attn2_modules(unet).values())
    nag.install(modules)
    handles = [m.register_forward_pre_hook(lambda _m, args: nag.begin_call(args[0], positive)) for m in modules]
    return nag, handles


def reference_forward(negative):
    def make(module):
        def forward(x, context=None, **kw):
            out = type(module).forward(module, x, context=context, **kw).clone()
            negatives = [negative[i : i + 1] for i in NEGATIVE_INDEX]
            out[ROWS] = reference_guided_rows(module, x, context, ROWS, negatives, PARAMS.scale, PARAMS.tau, PARAMS.alpha)
            return out

        return forward

    return make


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_unet_with_nag_on_every_attn2(family, record_difference):
    if family == "sd1":
        unet, width, extra = randomize_outputs(sd1_like_unet()), 768, {}
    else:
        unet, width = randomize_outputs(sdxl_like_unet()), 2048
        vector = torch.randn(2, SDXL_ADM_CHANNELS)
        extra = {"y": torch.cat([vector, vector])}
    latents = torch.randn(2, 4, 8, 8)
    x = torch.cat([latents, latents])
    timesteps = torch.full((4,), 500)
    context = torch.randn(4, 77, width)
    negative = torch.randn(2, 154, width)  # NAG negatives are longer than the prompts

    stock = unet(x, timesteps, context=context, **extra)
    nag, handles = hook_nag(unet, negative)
    guided = unet(x, timesteps, context=context, **extra)
    nag.remove()
    for handle in handles:
        handle.remove()
    assert nag.guided_calls == 7
    wrap_attn2(unet, reference_forward(negative))
    expected = unet(x, timesteps, context=context, **extra)
    unwrap_attn2(unet)

    assert len(attn2_modules(unet)) == 7
    assert torch.equal(guided[2:], stock[2:])  # uncond rows: bit-identical to the stock UNet
    difference = ((guided[:2] - expected[:2]).abs().max() / expected[:2].abs().max()).item()
    record_difference(difference, "relative")
    assert difference <= 1e-5
    assert (guided[:2] - stock[:2]).abs().max() > 1e-3 * stock.abs().max()
    assert torch.equal(unet(x, timesteps, context=context, **extra), stock)  # unhooked cleanly
