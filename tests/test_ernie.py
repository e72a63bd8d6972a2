"""NAG on ERNIE-Image through lib_nag.models.ernie, on a tiny stand-in of Forge Neo's
backend/nn/ernie.py (tests/forge/backend/nn/ernie.py), against the reference written from the
authors' image-first single-stream rule (tests/reference_ernie.py)."""

import pytest
import single_stream as checks
import torch
from backend.nn.ernie import ErnieImageModel
from modules import shared
from reference_ernie import reference_ernie
from single_stream import IMAGES, Case
from test_flux import EACH_LAYOUT, EACH_NEGATIVE_LENGTH, new_pass, per_image_schedules, randomized, relative, run_a_job_to_its_end
from test_forge import forge_model, sd_model_of
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models import ernie
from lib_nag.models.ernie import ErniePass, nag_forward
from lib_nag.models.unet import ForgeUNetPass

TEXT, PROMPT_TOKENS, CHANNELS = 24, 7, 8
SIZES = {"hidden_size": 64, "num_attention_heads": 4, "num_layers": 2, "ffn_hidden_size": 96, "rope_axes_dim": (4, 6, 6)}
ROPE_OPTIONS = {"scale_y": 0.5, "scale_x": 2.0, "shift_t": 3.0, "shift_y": 1.0, "shift_x": -2.0}


def tiny_model():
    """Patches of 2 (the real model's are 1) so that the un-patching's channel order is tested too."""
    return randomized(ErnieImageModel(**SIZES, in_channels=CHANNELS, out_channels=CHANNELS, patch_size=2, text_in_dim=TEXT))


def batch(chunks, negative_tokens=5):
    """A call's arguments for ``chunks`` (cond_or_uncond), 2 images of 6×10 latents (3×5 patches), and
    a NAG negative per image. The timestep is the predictor's: 1000·σ, repeated per chunk."""
    rows, sigmas = IMAGES * len(chunks), torch.rand(IMAGES)
    arguments = {"x": torch.randn(rows, CHANNELS, 6, 10), "timesteps": sigmas.repeat(len(chunks)) * 1000}
    arguments["context"] = torch.randn(rows, PROMPT_TOKENS, TEXT)
    arguments["transformer_options"] = {"cond_or_uncond": chunks, "sigmas": sigmas}
    return arguments, torch.randn(IMAGES, negative_tokens, TEXT)


ERNIE = Case(tiny_model, batch, nag_forward, reference_ernie)


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_matches_the_image_first_single_stream_rule_and_leaves_uncond_rows_alone(chunks, negative_tokens, record_difference):
    checks.check_guided_as_the_reference(ERNIE, chunks, negative_tokens, record_difference)


@EACH_NEGATIVE_LENGTH
def test_rope_options_move_the_nag_rows_as_the_model_moves_its_own(negative_tokens, record_difference):
    arguments, negative = batch([1, 0], negative_tokens)
    arguments["transformer_options"]["rope_options"] = ROPE_OPTIONS
    checks.check_guided_as_the_reference(ERNIE, [1, 0], negative_tokens, record_difference, arguments, negative, rope_options=ROPE_OPTIONS)


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_nag_rows_as_text_alone_equal_the_full_nag_stream(chunks, negative_tokens, record_difference):
    """Their image q/k/v are the positive rows', rotated with the NAG rows' own positions."""
    checks.check_text_alone_equals_the_full_nag_stream(ERNIE, chunks, negative_tokens, record_difference)


def test_the_nag_rows_positions_are_the_models_own_not_the_prompts_shifted():
    """ERNIE's RoPE is not a function of position differences: the NAG rows at the prompt's image
    position with their text shifted to keep its distances to the image (``L−L′ … L−1``) are not the
    model's own ``[image; NAG text]`` sequence, which the reference runs."""
    model = tiny_model()
    arguments, negative = batch([0], negative_tokens=3)
    own = ERNIE.guided(model, negative, arguments)
    ids = ernie._ids

    def shifted(rows, tokens, *rest):
        moved = ids(rows, tokens, *rest).clone()
        moved[..., 0] += PROMPT_TOKENS - tokens
        return moved

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ernie, "_ids", shifted)
        assert relative(ERNIE.guided(model, negative, arguments), own) > 1e-4


def test_without_a_cond_chunk_or_outside_the_window_the_model_runs_its_own_forward():
    checks.check_the_model_runs_its_own_forward_without_a_cond_chunk_or_outside_the_window(ERNIE)


def test_a_nag_negative_equal_to_the_prompt_changes_nothing(record_difference):
    checks.check_a_nag_negative_equal_to_the_prompt_changes_nothing(ERNIE, record_difference)


def test_scale_one_changes_nothing(record_difference):
    checks.check_scale_one_changes_nothing(ERNIE, record_difference)


def test_an_images_output_does_not_depend_on_its_place_in_the_batch(record_difference):
    checks.check_an_images_output_does_not_depend_on_its_place_in_the_batch(ERNIE, record_difference)


def test_what_the_model_ignores_nag_ignores_alike():
    """Neo's ERNIE-Image reads no ControlNet, patch or mask: NAG has nothing to stand aside from."""
    extra = {
        "control": {"input": [torch.randn(4, 9, 64)]},
        "attention_mask": torch.zeros(4, 1, 1),
        "transformer_options": {"patches_replace": {"dit": {("double_block", 0): None}}, "patches": {"post_input": []}},
    }
    checks.check_what_the_model_ignores_nag_ignores_alike(ERNIE, extra)


# --- the pass and the job -------------------------------------------------------------------------------


def test_the_pass_patches_a_clone_and_guides_inside_the_window():
    checks.check_the_pass_guides_a_clone_inside_the_window(ERNIE, ErniePass, "2 single-stream layers")


def test_the_nag_negative_is_encoded_as_a_prompt():
    """Neo's ErnieImage engine does not read ``is_negative_prompt``."""
    encodes = []
    shared.sd_model = sd_model_of(tiny_model())
    new_pass(ErniePass, torch.randn(IMAGES, 5, TEXT), encodes=encodes).close()
    assert encodes == [False]


@pytest.mark.parametrize("ending", ["finished", "interrupted", "raised"])
def test_nothing_is_left_after_any_job(ending):
    arguments, negative = batch([0])
    run_a_job_to_its_end(sd_model_of(tiny_model()), ErniePass, per_image_schedules(negative), arguments, ending)


def test_a_switch_between_sdxl_and_ernie_picks_each_models_pass():
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(forge_model(randomize_outputs(sd1_like_unet()))) is ForgeUNetPass
    assert host.pass_for(sd_model_of(tiny_model())) is ErniePass
    assert host.pass_for(forge_model(randomize_outputs(sd1_like_unet()))) is ForgeUNetPass


def test_an_ernie_built_otherwise_is_named_not_run():
    sd_model = sd_model_of(tiny_model())
    host = ForgeHost.__new__(ForgeHost)
    del sd_model.forge_objects.unet.model.diffusion_model.layers[0].self_attention.norm_q  # e.g. a fused-attention build
    assert host.pass_for(sd_model) is None
    assert host.unsupported_reason(sd_model) == (
        "NAG runs Forge Neo's ERNIE-Image as read at 5692d2d1; this ErnieImageModel is built otherwise, not supported yet"
    )
