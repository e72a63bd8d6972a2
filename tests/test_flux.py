"""NAG on Flux.1 and Chroma through lib_nag.hosts.forge_flux, on tiny stand-ins of Forge main's
backend/nn/flux.py and chroma.py, against the ComfyUI-NAG reference (tests/reference_joint.py)."""

import pytest
import torch
from backend.nn.chroma import IntegratedChromaTransformer2DModel
from backend.nn.flux import IntegratedFluxTransformer2DModel
from reference_joint import reference_joint

from lib_nag.hosts.forge_flux import nag_forward
from lib_nag.params import NagParams

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
NAG = (PARAMS.scale, PARAMS.tau, PARAMS.alpha)
IMAGES, T5, POOLED, PROMPT_TOKENS = 2, 32, 12, 7
SIZES = {"hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000}


def randomized(model):
    """Larger random weights than the default init, so every block changes its input visibly."""
    for parameter in model.parameters():
        parameter.copy_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def tiny_model(kind):
    if kind == "flux":
        return randomized(IntegratedFluxTransformer2DModel(4, POOLED, T5, qkv_bias=True, guidance_embed=True, **SIZES))
    return randomized(
        IntegratedChromaTransformer2DModel(4, T5, qkv_bias=True, guidance_out_dim=64, guidance_hidden_dim=32, guidance_n_layers=2, **SIZES)
    )


def batch(kind, chunks, negative_tokens=5):
    """A call's arguments for ``chunks`` (cond_or_uncond), 2 images of 5×6 latents (odd: padded), and
    a NAG negative per image."""
    rows = IMAGES * len(chunks)
    arguments = {"x": torch.randn(rows, 4, 5, 6), "timestep": torch.rand(rows), "context": torch.randn(rows, PROMPT_TOKENS, T5)}
    options = {"transformer_options": {"cond_or_uncond": chunks, "sigmas": arguments["timestep"]}}
    if kind == "chroma":
        return arguments | options, torch.randn(IMAGES, negative_tokens, T5)
    conditioning = {"y": torch.randn(rows, POOLED), "guidance": torch.full((rows,), 3.5)}
    return arguments | conditioning | options, {
        "crossattn": torch.randn(IMAGES, negative_tokens, T5),
        "vector": torch.randn(IMAGES, POOLED),
    }


def guided(model, negative, params=PARAMS, is_active=lambda options: True, calls=None):
    return nag_forward(model, negative, params, is_active, None if calls is None else lambda: calls.append(1))


def reference(model, kind, arguments, negative):
    """The reference on the call's rows reordered so that the cond chunks come last (ComfyUI's layout)."""
    chunks = arguments["transformer_options"]["cond_or_uncond"]
    cond = [c * IMAGES + j for c, label in enumerate(chunks) if label == 0 for j in range(IMAGES)]
    order = [r for r in range(IMAGES * len(chunks)) if r not in cond] + cond
    rows = {name: arguments[name][order] for name in ("x", "timestep", "context")}
    images = [r % IMAGES for r in cond]
    if kind == "chroma":
        out = reference_joint(model, **rows, nag_context=negative[images], nag=NAG)
    else:
        out = reference_joint(
            model, **rows, nag_context=negative["crossattn"][images], nag=NAG, y=arguments["y"][order],
            nag_y=negative["vector"][images], guidance=arguments["guidance"][order],
        )  # fmt: skip
    return out[torch.tensor(order).argsort()]


def relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


KINDS = ["flux", "chroma"]
LAYOUTS = {"cond only": [0], "uncond, cond": [1, 0], "cond, uncond": [0, 1]}


@pytest.mark.parametrize("negative_tokens", [5, 11], ids=["shorter NAG negative", "longer NAG negative"])
@pytest.mark.parametrize("chunks", LAYOUTS.values(), ids=LAYOUTS.keys())
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_authors_formulation_and_leaves_uncond_rows_alone(kind, chunks, negative_tokens, record_difference):
    model = tiny_model(kind)
    arguments, negative = batch(kind, chunks, negative_tokens)
    calls = []
    out = guided(model, negative, calls=calls)(**arguments)
    stock = model(**arguments)

    expected = reference(model, kind, arguments, negative)
    record_difference(relative(out, expected))
    assert relative(out, expected) <= 1e-5
    uncond = [c * IMAGES + j for c, label in enumerate(chunks) if label == 1 for j in range(IMAGES)]
    cond = [r for r in range(len(out)) if r not in uncond]
    assert torch.equal(out[uncond], stock[uncond])
    assert relative(out[cond], stock[cond]) > 1e-3  # NAG changed the cond rows
    assert calls == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_cond_chunk_or_outside_the_window_the_model_runs_its_own_forward(kind):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1])
    calls = []
    assert torch.equal(guided(model, negative, calls=calls)(**arguments), model(**arguments))
    arguments, negative = batch(kind, [1, 0])
    assert torch.equal(guided(model, negative, is_active=lambda options: False, calls=calls)(**arguments), model(**arguments))
    assert calls == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_nag_negative_equal_to_the_prompt_changes_nothing(kind, record_difference):
    model = tiny_model(kind)
    arguments, _ = batch(kind, [0])
    negative = arguments["context"] if kind == "chroma" else {"crossattn": arguments["context"], "vector": arguments["y"]}
    difference = relative(guided(model, negative)(**arguments), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_scale_one_changes_nothing(kind, record_difference):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1, 0])
    difference = relative(guided(model, negative, NagParams(enabled=True, scale=1.0))(**arguments), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-6
