"""NAG on Anima through lib_nag.models.anima, on a tiny stand-in of Forge Neo's backend/nn/anima.py
(tests/forge/backend/nn/anima.py), against a reference derived from the authors' Wan cross-attention
rule (tests/reference_anima.py); the pass's helpers are tests/test_wan.py's."""

from types import SimpleNamespace

import pytest
import torch
from backend.args import dynamic_args
from backend.nn import anima
from modules import script_callbacks, shared
from reference_anima import reference_anima
from test_flux import assert_guided_as_expected, new_pass, randomized, relative
from test_forge import all_hooks_gone, denoiser_step, forge_model
from test_wan import (
    EACH_LAYOUT,
    NAG,
    PARAMS,
    cond_rows,
    engine,
    guided,
    job_with_host,
    positive_last,
    run_job,
    sample_in_and_after_the_window,
)
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models.anima import AnimaPass
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.models.wan import WanPass
from lib_nag.params import NagParams
from lib_nag.webui.report import JobReport

IMAGES, TEXT, PROMPT_TOKENS = 2, 24, 12
CONTEXTS = {"Neo's [N, 1, L, C]": True, "[N, L, C]": False}
EACH_NEGATIVE_LENGTH = pytest.mark.parametrize("negative_tokens", [7, 20], ids=["shorter NAG negative", "longer NAG negative"])


class Anima(SimpleNamespace):
    """Forge Neo's engine class for Anima checkpoints (its name is the console's)."""


def tiny_model():
    sizes = {"model_channels": 32, "crossattn_emb_channels": TEXT, "adaln_lora_dim": 8, "num_blocks": 2, "num_heads": 2, "mlp_ratio": 2.0}
    rope = {"rope_h_extrapolation_ratio": 4.0, "rope_w_extrapolation_ratio": 4.0, "rope_t_extrapolation_ratio": 1.0}
    return randomized(anima.Anima(4, 4, 2, 1, **sizes, **rope))


@pytest.fixture(autouse=True)
def _no_reference_latents():
    yield
    dynamic_args.pop("ref_latents", None)


def batch(chunks, negative_tokens=7, token_axis=True, images=IMAGES):
    """One model call's arguments as Neo's KModel makes them: ``images`` latents per chunk (one frame,
    5×7: odd, padded), the timestep σ (multiplier 1), the prompt contexts as Neo stacks its per-prompt
    ``[1, L, C]`` tensors (``token_axis``) or flat; and a NAG negative per image, stacked alike."""
    rows, sigmas = images * len(chunks), torch.rand(images)
    shape = (1, PROMPT_TOKENS, TEXT) if token_axis else (PROMPT_TOKENS, TEXT)
    arguments = {"x": torch.randn(rows, 4, 1, 5, 7), "timesteps": sigmas.repeat(len(chunks)), "context": torch.randn(rows, *shape)}
    negative = torch.randn(images, *(1, negative_tokens, TEXT) if token_axis else (negative_tokens, TEXT))
    return arguments | {"transformer_options": {"cond_or_uncond": chunks, "sigmas": sigmas}}, negative


def anima_guided(model, negative, arguments, params=PARAMS):
    return guided(model, negative, arguments, params, pass_class=AnimaPass, engine_class=Anima)


def reference(model, arguments, negative):
    chunks = arguments["transformer_options"]["cond_or_uncond"]
    rows, order, images = positive_last(arguments, ("x", "timesteps", "context"), chunks, len(negative))
    out = reference_anima(model, **rows, nag_context=negative[images], nag=NAG)
    return out[torch.tensor(order).argsort()]


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
@pytest.mark.parametrize("token_axis", CONTEXTS.values(), ids=CONTEXTS.keys())
def test_matches_the_wan_rule_and_leaves_uncond_rows_alone(chunks, negative_tokens, token_axis, record_difference):
    model = tiny_model()
    arguments, negative = batch(chunks, negative_tokens, token_axis)
    out, nag_pass = anima_guided(model, negative, arguments)
    stock = model(**arguments)
    assert_guided_as_expected(out, stock, reference(model, arguments, negative), cond_rows(chunks, IMAGES), record_difference)
    assert nag_pass.report.guided_calls == nag_pass.report.placed == nag_pass.report.calls == 2


def test_a_reference_latents_tokens_are_guided_with_the_image(record_difference):
    """Neo's ``anima_do_reference`` adds the reference latent's frames to the query side (one image:
    Neo keeps one reference latent, doubled for a cond and uncond batch)."""
    model = tiny_model()
    arguments, negative = batch([1, 0], images=1)
    stock_without = model(**arguments)
    dynamic_args["ref_latents"] = [torch.randn(1, 4, 1, 5, 7)]
    out, _ = anima_guided(model, negative, arguments)
    stock = model(**arguments)
    assert_guided_as_expected(out, stock, reference(model, arguments, negative), cond_rows([1, 0]), record_difference)
    assert relative(stock, stock_without) > 1e-3  # the reference took part


def test_without_a_cond_chunk_or_outside_the_window_the_model_is_the_hosts():
    model = tiny_model()
    arguments, negative = batch([1])
    out, nag_pass = anima_guided(model, negative, arguments)
    assert torch.equal(out, model(**arguments)) and nag_pass.nag.guided_calls == 0
    arguments, negative = batch([0, 1])
    out, _ = anima_guided(model, negative, arguments, NagParams(enabled=True, start=0.5))
    assert torch.equal(out, model(**arguments))


def test_a_nag_negative_equal_to_the_prompt_and_scale_one_change_nothing(record_difference):
    model = tiny_model()
    arguments, negative = batch([1, 0])
    stock = model(**arguments)
    same, _ = anima_guided(model, arguments["context"][IMAGES:], arguments)
    unscaled, _ = anima_guided(model, negative, arguments, NagParams(enabled=True, scale=1.0))
    record_difference(max(relative(same, stock), relative(unscaled, stock)))
    assert relative(same, stock) <= 1e-5 and relative(unscaled, stock) <= 1e-6


def test_an_images_output_does_not_depend_on_its_position_in_the_batch(record_difference):
    model = tiny_model()
    arguments, negative = batch([1, 0])
    order = [1, 0, 3, 2]  # the images swapped in each chunk
    swapped = {**arguments, **{name: arguments[name][order] for name in ("x", "timesteps", "context")}}
    swapped["transformer_options"] = {"cond_or_uncond": [1, 0], "sigmas": arguments["transformer_options"]["sigmas"].flip(0)}
    out, _ = anima_guided(model, negative, arguments)
    flipped, _ = anima_guided(model, negative.flip(0), swapped)
    record_difference(relative(flipped[order], out))
    assert relative(flipped[order], out) <= 1e-6


def test_the_pass_hooks_the_model_guides_inside_the_window_and_leaves_nothing():
    model = tiny_model()
    arguments, negative = batch([1, 0])
    stock, (expected, _) = model(**arguments), anima_guided(model, negative, arguments)
    shared.sd_model = engine(model, Anima)
    assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), shared.sd_model) is AnimaPass
    nag_pass = sample_in_and_after_the_window(model, AnimaPass, negative, arguments, stock, expected)
    assert all_hooks_gone(model) and not script_callbacks.callback_map["callbacks_cfg_denoiser"]
    line = JobReport(model="Anima", passes={False: nag_pass.report}).line()
    assert line == "[NAG] active on Anima: first pass 1/10 steps guided (2 cross-attention calls), 2 cross-attention layers hooked"


@pytest.mark.parametrize("ending", ["finished", "interrupted", "raised"])
def test_nothing_is_left_after_any_anima_job(ending, capsys):
    model = tiny_model()
    arguments, negative = batch([1, 0])
    host = job_with_host(model, negative, Anima)
    _job, p = run_job(host, model, arguments, ending)
    assert host.live is None and all_hooks_gone(model) and not script_callbacks.callback_map["callbacks_cfg_denoiser"]
    assert torch.equal(model(**arguments), type(model).forward(model, **arguments))
    assert ("NAG scale" in p.extra_generation_params) == (ending != "raised")
    steps = "3/3 steps guided (6" if ending == "finished" else "2/3 steps guided (4"
    assert f"[NAG] active on Anima: first pass {steps} cross-attention calls), 2 cross-attention layers hooked" in capsys.readouterr().out


def test_a_switch_between_sdxl_wan_and_anima_picks_each_models_pass():
    from test_wan import tiny_model as wan_model

    host = ForgeHost.__new__(ForgeHost)
    sdxl = forge_model(randomize_outputs(sd1_like_unet()))
    for sd_model, expected in (
        (sdxl, ForgeUNetPass),
        (engine(tiny_model()), AnimaPass),
        (engine(wan_model("t2v")), WanPass),
        (sdxl, ForgeUNetPass),
    ):
        assert host.pass_for(sd_model) is expected


def test_the_self_attention_is_never_taken_for_a_cross_attention():
    model = tiny_model()
    shared.sd_model = engine(model, Anima)
    nag_pass = new_pass(AnimaPass, torch.randn(IMAGES, 7, TEXT))
    try:
        denoiser_step(nag_pass, 0)
        hooked = {module for module in model.modules() if module._forward_hooks or module._forward_pre_hooks}
    finally:
        nag_pass.close()
    cross = [block.cross_attn for block in model.blocks]
    assert hooked == {model, *cross, *(c.q_proj for c in cross), *(c.output_proj for c in cross)}
