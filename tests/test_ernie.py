"""NAG on ERNIE-Image through lib_nag.models.ernie, on a tiny stand-in of Forge Neo's
backend/nn/ernie.py (tests/forge/backend/nn/ernie.py), against the reference written from the
authors' image-first single-stream rule (tests/reference_ernie.py)."""

from types import SimpleNamespace

import pytest
import torch
from backend.nn.ernie import ErnieImageModel
from backend.patcher.unet import UnetPatcher
from modules import prompt_parser, shared
from reference_ernie import reference_ernie
from test_flux import (
    EACH_LAYOUT,
    EACH_NEGATIVE_LENGTH,
    NAG,
    PARAMS,
    assert_guided_as_expected,
    nothing_is_left_after_a_job,
    randomized,
    relative,
    sample_in_and_after_the_window,
)
from test_forge import forge_model
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models import ernie
from lib_nag.models.ernie import ErniePass, nag_forward
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.params import NagParams
from lib_nag.webui.forge_patcher import forge_rows
from lib_nag.webui.report import JobReport, PassReport

IMAGES, TEXT, PROMPT_TOKENS, CHANNELS = 2, 24, 7, 8
SIZES = {"hidden_size": 64, "num_attention_heads": 4, "num_layers": 2, "ffn_hidden_size": 96, "rope_axes_dim": (4, 6, 6)}
ROPE_OPTIONS = {"scale_y": 0.5, "scale_x": 2.0, "shift_t": 3.0, "shift_y": 1.0, "shift_x": -2.0}


def tiny_model():
    """Patches of 2 (the real model's are 1) so that the un-patching's channel order is tested too."""
    return randomized(ErnieImageModel(**SIZES, in_channels=CHANNELS, out_channels=CHANNELS, patch_size=2, text_in_dim=TEXT))


def batch(chunks, negative_tokens=5, prompt_tokens=PROMPT_TOKENS):
    """A call's arguments for ``chunks`` (cond_or_uncond), 2 images of 6×10 latents (3×5 patches), and
    a NAG negative per image. The timestep is the predictor's: 1000·σ, repeated per chunk."""
    rows, sigmas = IMAGES * len(chunks), torch.rand(IMAGES)
    arguments = {"x": torch.randn(rows, CHANNELS, 6, 10), "timesteps": sigmas.repeat(len(chunks)) * 1000}
    arguments["context"] = torch.randn(rows, prompt_tokens, TEXT)
    arguments["transformer_options"] = {"cond_or_uncond": chunks, "sigmas": sigmas}
    return arguments, torch.randn(IMAGES, negative_tokens, TEXT)


def cond_rows(chunks):
    return [c * IMAGES + j for c, label in enumerate(chunks) if label == 0 for j in range(IMAGES)]


def guided(model, negative, arguments, params=PARAMS, is_active=lambda options: True, calls=None):
    """The model called with NAG's forward as its instance ``forward`` (removed after)."""
    on_call = None if calls is None else lambda guided, why: calls.append((guided, why))
    model.forward = nag_forward(model, lambda: negative, params, forge_rows(is_active, on_call), on_call)
    try:
        return model(**arguments)
    finally:
        del model.forward


def reference(model, arguments, negative, dtype=torch.float64):
    cond = cond_rows(arguments["transformer_options"]["cond_or_uncond"])
    rope_options = arguments["transformer_options"].get("rope_options")
    nag_context = negative[[r % IMAGES for r in cond]]
    return reference_ernie(model, arguments["x"], arguments["timesteps"], arguments["context"], cond, nag_context, NAG, rope_options, dtype)


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_matches_the_image_first_single_stream_rule_and_leaves_uncond_rows_alone(chunks, negative_tokens, record_difference):
    model = tiny_model()
    arguments, negative = batch(chunks, negative_tokens)
    calls = []
    out = guided(model, negative, arguments, calls=calls)
    assert_guided_as_expected(out, model(**arguments), reference(model, arguments, negative), cond_rows(chunks), record_difference)
    assert calls == [(True, "")]


@EACH_NEGATIVE_LENGTH
def test_rope_options_move_the_nag_rows_as_the_model_moves_its_own(negative_tokens, record_difference):
    model = tiny_model()
    arguments, negative = batch([1, 0], negative_tokens)
    arguments["transformer_options"]["rope_options"] = ROPE_OPTIONS
    out = guided(model, negative, arguments)
    assert_guided_as_expected(out, model(**arguments), reference(model, arguments, negative), cond_rows([1, 0]), record_difference)


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_nag_rows_as_text_alone_equal_the_full_nag_stream(chunks, negative_tokens, record_difference):
    """ERNIE's modulation carries no text: NAG's rows as their text alone (their image q/k/v the positive
    rows', rotated with the NAG rows' own positions) give what full ``[image; NAG text]`` rows give,
    computed alike in float32."""
    model = tiny_model()
    arguments, negative = batch(chunks, negative_tokens)
    difference = relative(guided(model, negative, arguments), reference(model, arguments, negative, torch.float32))
    record_difference(difference)
    assert difference <= 1e-6


def test_the_nag_rows_positions_are_the_models_own_not_the_prompts_shifted():
    """ERNIE's RoPE is not a function of position differences: the NAG rows at the prompt's image
    position with their text shifted to keep its distances to the image (``L−L′ … L−1``) are not the
    model's own ``[image; NAG text]`` sequence, which the reference above runs."""
    model = tiny_model()
    arguments, negative = batch([0], negative_tokens=3)
    own = guided(model, negative, arguments)
    ids = ernie._ids

    def shifted(rows, tokens, *rest):
        moved = ids(rows, tokens, *rest).clone()
        moved[..., 0] += PROMPT_TOKENS - tokens
        return moved

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ernie, "_ids", shifted)
        assert relative(guided(model, negative, arguments), own) > 1e-4


def test_without_a_cond_chunk_or_outside_the_window_the_model_runs_its_own_forward():
    model = tiny_model()
    arguments, negative = batch([1])
    calls = []
    assert torch.equal(guided(model, negative, arguments, calls=calls), model(**arguments))
    arguments, negative = batch([1, 0])
    assert torch.equal(guided(model, negative, arguments, is_active=lambda options: False, calls=calls), model(**arguments))
    assert calls == []


def test_a_nag_negative_equal_to_the_prompt_changes_nothing(record_difference):
    model = tiny_model()
    arguments, _ = batch([0])
    difference = relative(guided(model, arguments["context"], arguments), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-5


def test_scale_one_changes_nothing(record_difference):
    model = tiny_model()
    arguments, negative = batch([1, 0])
    difference = relative(guided(model, negative, arguments, NagParams(enabled=True, scale=1.0)), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-6


def test_an_images_output_does_not_depend_on_its_place_in_the_batch(record_difference):
    model = tiny_model()
    arguments, negative = batch([1, 0])
    out = guided(model, negative, arguments)
    swap = [1, 0, 3, 2]  # the two images trade places in both chunks
    swapped = {**arguments, "x": arguments["x"][swap], "timesteps": arguments["timesteps"][swap], "context": arguments["context"][swap]}
    swapped["transformer_options"] = {**arguments["transformer_options"], "sigmas": arguments["transformer_options"]["sigmas"][[1, 0]]}
    difference = relative(guided(model, negative[[1, 0]], swapped)[swap], out)
    record_difference(difference)
    assert difference <= 1e-6


def test_what_the_model_ignores_nag_ignores_alike():
    """Neo's ERNIE-Image reads no ControlNet, patch or mask: NAG has nothing to stand aside from."""
    model = tiny_model()
    arguments, negative = batch([1, 0])
    options = arguments["transformer_options"] | {"patches_replace": {"dit": {("double_block", 0): None}}, "patches": {"post_input": []}}
    extra = {"control": {"input": [torch.randn(4, 9, 64)]}, "attention_mask": torch.zeros(4, 1, 1), "transformer_options": options}
    assert torch.equal(model(**arguments, control=extra["control"]), model(**arguments | extra))
    assert torch.equal(guided(model, negative, arguments | extra), guided(model, negative, arguments))


# --- the pass: Forge's patcher, object patch, step window and job ------------------------------------


def neo_sd_model(model):
    """What Neo's sd_model holds: the patcher over a KModel."""
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(SimpleNamespace(diffusion_model=model))))


def new_pass(pass_class, negative, params=PARAMS, encodes=None):
    """A pass whose job encodes ``negative`` (one row per image) for every step; ``encodes`` collects
    the ``as_negative_prompt`` of each encoding."""
    schedules = [[prompt_parser.ScheduledPromptConditioning(10, cond)] for cond in negative]

    def encode(p, params, is_hires, as_negative_prompt):
        if encodes is not None:
            encodes.append(as_negative_prompt)
        return schedules

    job = SimpleNamespace(p=object(), params=params, negative=SimpleNamespace(encode=encode))
    return pass_class(job, PassReport(is_hires=False))


def check_pass_guides_a_clone_inside_the_window(sd_model, pass_class, arguments, negative, call_guided, hooked):
    """The family's pass patches a clone of the patcher, guides step 0 and not step 5 (end 0.5 of 10),
    writes its console line and sets everything back."""
    shared.sd_model = sd_model
    original = sd_model.forge_objects.unet
    model = original.model.diffusion_model
    stock = model(**arguments)
    assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), sd_model) is pass_class
    nag_pass = new_pass(pass_class, negative, NagParams(enabled=True, end=0.5))
    patcher = sd_model.forge_objects.unet
    assert patcher is not original and not original.object_patches and "forward" not in vars(model)
    sample_in_and_after_the_window(nag_pass, patcher, lambda: model(**arguments), call_guided, stock)
    assert sd_model.forge_objects.unet is original
    assert nag_pass.report.guided == {0} and nag_pass.report.guided_calls == 1
    name = type(model).__name__
    line = JobReport(model=name, passes={False: nag_pass.report}).line()
    assert line == f"[NAG] active on {name}: first pass 1/10 steps guided (1 model calls), {hooked}"


def test_the_pass_patches_a_clone_and_guides_inside_the_window():
    model = tiny_model()
    arguments, negative = batch([1, 0])
    check_pass_guides_a_clone_inside_the_window(
        neo_sd_model(model), ErniePass, arguments, negative, lambda: guided(model, negative, arguments), "2 single-stream layers"
    )


def test_the_nag_negative_is_encoded_as_a_prompt_the_engine_does_not_template():
    encodes = []
    shared.sd_model = neo_sd_model(tiny_model())
    new_pass(ErniePass, torch.randn(IMAGES, 5, TEXT), encodes=encodes).close()
    assert encodes == [False]  # Neo's ErnieImage engine does not read is_negative_prompt


@pytest.mark.parametrize("ending", ["finished", "interrupted", "raised"])
def test_nothing_is_left_after_any_job(ending):
    arguments, negative = batch([0])
    nothing_is_left_after_a_job(neo_sd_model(tiny_model()), ErniePass, arguments, negative, ending)


def test_a_switch_between_sdxl_and_ernie_picks_each_models_pass():
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(forge_model(randomize_outputs(sd1_like_unet()))) is ForgeUNetPass
    assert host.pass_for(neo_sd_model(tiny_model())) is ErniePass
    assert host.pass_for(forge_model(randomize_outputs(sd1_like_unet()))) is ForgeUNetPass


def test_an_ernie_built_otherwise_is_named_not_run():
    sd_model = neo_sd_model(tiny_model())
    host = ForgeHost.__new__(ForgeHost)
    del sd_model.forge_objects.unet.model.diffusion_model.layers[0].self_attention.norm_q  # e.g. a fused-attention build
    assert host.pass_for(sd_model) is None
    assert host.unsupported_reason(sd_model) == (
        "NAG runs Forge Neo's ERNIE-Image as read at 5692d2d1; this ErnieImageModel is built otherwise, not supported yet"
    )
