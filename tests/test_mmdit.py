"""NAG on SD3/SD3.5 through lib_nag.models.mmdit, on tiny stand-ins of A1111 1.10.1's MMDiT
(modules/models/sd3/mmdit.py, SD3 Medium) and Forge main's MMDiT-X (backend/nn/mmditx.py: SD3.5 Large's
rms qk-norm, SD3.5 Medium's image self-attention), against the ComfyUI-NAG reference
(tests/reference_mmdit.py)."""

import pytest
import torch
from backend.nn.flux import IntegratedFluxTransformer2DModel
from backend.nn.mmditx import MMDiTX
from modules import shared
from modules.models.sd3.mmdit import MMDiT
from reference_mmdit import reference_mmdit
from test_flux import (
    EACH_LAYOUT,
    EACH_NEGATIVE_LENGTH,
    SIZES,
    assert_guided_as_expected,
    new_pass,
    relative,
    sample_in_and_after_the_window,
)
from test_forge import sd_model_of

from lib_nag.attention import PositiveRows
from lib_nag.hosts.forge import ForgeHost
from lib_nag.models.mmdit import STOOD_ASIDE, ForgeMMDiTPass, is_mmdit, nag_forward
from lib_nag.params import NagParams
from lib_nag.webui.forge_patcher import forge_rows
from lib_nag.webui.report import JobReport

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
IMAGES, CONTEXT, POOLED, PROMPT_TOKENS, DEPTH = 2, 24, 12, 7, 3
SD3 = {"depth": DEPTH, "adm_in_channels": POOLED, "context_in": CONTEXT}
KINDS = {
    "a1111 sd3": lambda: MMDiT(**SD3),
    "forge sd3.5 large": lambda: MMDiTX(**SD3, qk_norm="rms"),
    "forge sd3.5 medium": lambda: MMDiTX(**SD3, qk_norm="rms", x_block_self_attn_layers=[0, 1]),
}


def tiny_model(kind):
    """Random weights (buffers too: the positional embedding), small enough that the 64·depth-wide
    blocks stay in a range where float32 follows the float64 reference."""
    model = KINDS[kind]()
    for tensor in (*model.parameters(), *model.buffers()):
        tensor.copy_(torch.randn_like(tensor) * 0.1)
    return model.eval()


def is_forge(kind):
    return kind.startswith("forge")


def cond_rows(chunks):
    return [c * IMAGES + j for c, label in enumerate(chunks) if label == 0 for j in range(IMAGES)]


def batch(kind, chunks, negative_tokens=5):
    """A call's arguments for ``chunks`` (cond_or_uncond; A1111 gets the same rows), 2 images of 6×8
    latents, and a NAG negative per image. ``t`` is σ·1000, as both hosts give it."""
    rows, sigmas = IMAGES * len(chunks), torch.rand(IMAGES)
    arguments = {
        "x": torch.randn(rows, 16, 6, 8),
        "t": sigmas.repeat(len(chunks)) * 1000,
        "y": torch.randn(rows, POOLED),
        "context": torch.randn(rows, PROMPT_TOKENS, CONTEXT),
    }
    if is_forge(kind):
        arguments["transformer_options"] = {"cond_or_uncond": chunks, "sigmas": sigmas}
    return arguments, {"crossattn": torch.randn(IMAGES, negative_tokens, CONTEXT), "vector": torch.randn(IMAGES, POOLED)}


def rows_of(kind, chunks, calls):
    """Forge's rows from ``transformer_options``; A1111's as its placement gives them (here: the cond chunks)."""
    if is_forge(kind):
        return forge_rows(lambda options: True, lambda guided, why: calls.append((guided, why)))
    cond = cond_rows(chunks)
    return lambda x, context, kwargs: PositiveRows.of(cond, [r % IMAGES for r in cond], x.device)


def guided(model, negative, arguments, rows, params=PARAMS, calls=None):
    """The model called with NAG's forward in place of its own (then removed)."""
    on_call = None if calls is None else lambda guided, why: calls.append((guided, why))
    model.forward = nag_forward(model, lambda: negative, params, rows, on_call)
    try:
        return model(**arguments)
    finally:
        del model.forward


def reference(model, arguments, negative, skip_layers=()):
    """The reference on the call's rows reordered so that the cond rows come last (ComfyUI's layout)."""
    chunks = arguments.get("transformer_options", {}).get("cond_or_uncond") or arguments["chunks"]
    cond = cond_rows(chunks)
    order = [r for r in range(len(arguments["x"])) if r not in cond] + cond
    images = [r % IMAGES for r in cond]
    out = reference_mmdit(
        model, *(arguments[name][order] for name in ("x", "t", "context")), negative["crossattn"][images],
        (PARAMS.scale, PARAMS.tau, PARAMS.alpha), arguments["y"][order], negative["vector"][images], skip_layers,
    )  # fmt: skip
    return out[torch.tensor(order).argsort()]


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
@pytest.mark.parametrize("kind", KINDS)
def test_guides_the_positive_rows_as_the_authors_and_no_other_row(kind, chunks, negative_tokens, record_difference):
    model, calls = tiny_model(kind), []
    arguments, negative = batch(kind, chunks, negative_tokens)
    out = guided(model, negative, arguments, rows_of(kind, chunks, calls), calls=calls)
    expected = reference(model, arguments | {"chunks": chunks}, negative)
    assert_guided_as_expected(out, model(**arguments), expected, cond_rows(chunks), record_difference)
    assert calls == [(True, "")]


@pytest.mark.parametrize("kind", KINDS)
def test_without_positive_rows_the_model_runs_its_own_forward(kind):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1, 0])
    calls = []
    nothing = lambda x, context, kwargs: None  # noqa: E731
    assert torch.equal(guided(model, negative, arguments, nothing, calls=calls), model(**arguments))
    if is_forge(kind):
        arguments, negative = batch(kind, [1])
        assert torch.equal(guided(model, negative, arguments, rows_of(kind, [1], calls), calls=calls), model(**arguments))
        arguments, negative = batch(kind, [1, 0])
        outside = forge_rows(lambda options: False)
        assert torch.equal(guided(model, negative, arguments, outside, calls=calls), model(**arguments))
    assert calls == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_nag_negative_equal_to_the_prompt_or_scale_one_changes_nothing(kind, record_difference):
    model = tiny_model(kind)
    chunks = [1, 0]
    arguments, negative = batch(kind, chunks)
    stock = model(**arguments)
    cond = cond_rows(chunks)
    prompt = {"crossattn": arguments["context"][cond], "vector": arguments["y"][cond]}
    same_prompt = guided(model, prompt, arguments, rows_of(kind, chunks, []))
    record_difference(relative(same_prompt, stock), "NAG negative = prompt")
    assert relative(same_prompt, stock) <= 1e-5
    scale_one = guided(model, negative, arguments, rows_of(kind, chunks, []), params=NagParams(enabled=True, scale=1.0))
    record_difference(relative(scale_one, stock), "scale 1")
    assert relative(scale_one, stock) <= 1e-6


def test_forge_skip_layers_skips_the_nag_stream_too(record_difference):
    model = tiny_model("forge sd3.5 medium")
    chunks = [1, 0]
    arguments, negative = batch("forge sd3.5 medium", chunks)
    arguments["transformer_options"]["skip_layers"] = [1]
    out = guided(model, negative, arguments, rows_of("forge sd3.5 medium", chunks, []))
    expected = reference(model, arguments, negative, skip_layers=[1])
    record_difference(relative(out, expected))
    assert relative(out, expected) <= 1e-5
    assert relative(out, reference(model, arguments, negative)) > 1e-3  # the skip mattered
    assert torch.equal(out[:IMAGES], model(**arguments)[:IMAGES])


def test_forge_controlnet_call_runs_the_models_own_forward():
    model = tiny_model("forge sd3.5 large")
    arguments, negative = batch("forge sd3.5 large", [1, 0])
    arguments["control"] = [torch.randn(2 * IMAGES, 12, 64 * DEPTH)]
    calls = []
    out = guided(model, negative, arguments, rows_of("forge sd3.5 large", [1, 0], calls), calls=calls)
    assert torch.equal(out, model(**arguments))
    assert calls == [(False, STOOD_ASIDE)]


def test_is_mmdit_recognises_both_hosts_models_only():
    assert all(is_mmdit(make()) for make in KINDS.values())
    assert not is_mmdit(IntegratedFluxTransformer2DModel(4, POOLED, CONTEXT, qkv_bias=True, guidance_embed=True, **SIZES))


def test_the_forge_pass_patches_a_clone_and_guides_inside_the_window():
    model = tiny_model("forge sd3.5 large")
    shared.sd_model = sd_model_of(model, is_sd3=True)
    original = shared.sd_model.forge_objects.unet
    arguments, negative = batch("forge sd3.5 large", [1, 0])
    stock = model(**arguments)
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(shared.sd_model) is ForgeMMDiTPass
    nag_pass = new_pass(ForgeMMDiTPass, negative, NagParams(enabled=True, end=0.5))
    patcher = shared.sd_model.forge_objects.unet
    rows = rows_of("forge sd3.5 large", [1, 0], [])
    sample_in_and_after_the_window(nag_pass, patcher, lambda: model(**arguments), lambda: guided(model, negative, arguments, rows), stock)
    assert shared.sd_model.forge_objects.unet is original
    line = JobReport(model="SD3", passes={False: nag_pass.report}).line()
    assert line == "[NAG] active on SD3: first pass 1/10 steps guided (1 model calls), 3 joint blocks"
