"""NAG on Krea 2 through lib_nag.models.krea, on a tiny stand-in of Forge Neo's backend/nn/krea.py
(tests/forge/backend/nn/krea.py), against the reference written from the authors' text-first
single-stream rule (tests/reference_krea.py)."""

from types import SimpleNamespace

import pytest
import single_stream as checks
import torch
from backend.nn.krea import SingleStreamDiT
from harness import reset_host, txt2img
from modules import shared
from reference_krea import reference_krea
from single_stream import IMAGES, Case
from test_ernie import tiny_model as tiny_ernie
from test_flux import EACH_LAYOUT, EACH_NEGATIVE_LENGTH, PARAMS, per_image_schedules, randomized, relative, run_a_job_to_its_end
from test_flux import tiny_model as tiny_flux
from test_forge import forge_model, sd_model_of
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models.krea import STOOD_ASIDE, KreaPass, nag_forward
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.params import NagParams
from lib_nag.webui.conditioning import NegativeConditioning
from lib_nag.webui.report import PassReport

TEXT_LAYERS, TEXT_WIDTH, PROMPT_TOKENS, CHANNELS = 3, 24, 7, 4
SIZES = {"features": 64, "tdim": 32, "heads": 4, "kvheads": 2, "multiplier": 2, "layers": 2, "patch": 2, "channels": CHANNELS}
TEXT_SIZES = {"txtdim": TEXT_WIDTH, "txtlayers": TEXT_LAYERS, "txtheads": 2, "txtkvheads": 2}


def tiny_model():
    """Grouped-query attention as the real model's (here 4 query heads over 2 key/value heads)."""
    return randomized(SingleStreamDiT(**SIZES, **TEXT_SIZES))


def conditioning(rows, tokens):
    """What Neo's Qwen3-VL engine gives per prompt, batched: ``[rows, 1, tokens, layers·width]``."""
    return torch.randn(rows, 1, tokens, TEXT_LAYERS * TEXT_WIDTH)


def batch(chunks, negative_tokens=5):
    """A call's arguments for ``chunks`` (cond_or_uncond): 2 images of ``[4, 1, 5, 7]`` latents (Wan's
    5-D layout; odd sizes: padded), the timestep σ repeated per chunk, and a NAG negative per image."""
    rows, sigmas = IMAGES * len(chunks), torch.rand(IMAGES)
    arguments = {
        "x": torch.randn(rows, CHANNELS, 1, 5, 7),
        "timesteps": sigmas.repeat(len(chunks)),
        "context": conditioning(rows, PROMPT_TOKENS),
    }
    arguments["transformer_options"] = {"cond_or_uncond": chunks, "sigmas": sigmas}
    return arguments, conditioning(IMAGES, negative_tokens)


KREA = Case(tiny_model, batch, nag_forward, reference_krea)


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_matches_the_text_first_single_stream_rule_and_leaves_uncond_rows_alone(chunks, negative_tokens, record_difference):
    checks.check_guided_as_the_reference(KREA, chunks, negative_tokens, record_difference)


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_nag_rows_as_text_alone_equal_the_full_nag_stream(chunks, negative_tokens, record_difference):
    """Their image q/k/v are the positive rows'; each NAG text token keeps its own output gate."""
    checks.check_text_alone_equals_the_full_nag_stream(KREA, chunks, negative_tokens, record_difference)


def test_the_attention_output_is_guided_before_the_gate():
    """NAG is defined on the attention output: guiding ``attention · sigmoid(gate(x))`` instead would
    change the L1 norms the τ cap compares (τ 1 here, so that the cap acts), and the image."""
    model = tiny_model()
    arguments, negative = batch([1, 0])
    out = KREA.guided(model, negative, arguments, NagParams(enabled=True, scale=5.0, tau=1.0, alpha=0.5))
    assert relative(out, KREA.expected(model, arguments, negative, nag=(5.0, 1.0, 0.5))) <= 1e-5
    assert relative(out, KREA.expected(model, arguments, negative, nag=(5.0, 1.0, 0.5), guide_gated=True)) > 1e-3


def test_without_a_cond_chunk_or_outside_the_window_the_model_runs_its_own_forward():
    checks.check_the_model_runs_its_own_forward_without_a_cond_chunk_or_outside_the_window(KREA)


def test_a_nag_negative_equal_to_the_prompt_changes_nothing(record_difference):
    checks.check_a_nag_negative_equal_to_the_prompt_changes_nothing(KREA, record_difference)


def test_scale_one_changes_nothing(record_difference):
    checks.check_scale_one_changes_nothing(KREA, record_difference)


def test_an_images_output_does_not_depend_on_its_place_in_the_batch(record_difference):
    checks.check_an_images_output_does_not_depend_on_its_place_in_the_batch(KREA, record_difference)


def test_4d_latents_are_guided_as_5d_ones():
    model = tiny_model()
    arguments, negative = batch([1, 0])
    flat = arguments | {"x": arguments["x"][:, :, 0]}
    assert torch.equal(KREA.guided(model, negative, flat), KREA.guided(model, negative, arguments)[:, :, 0])


def test_a_call_with_reference_latents_runs_the_models_own_forward(monkeypatch):
    """Neo's reference-latent path is not reachable from its sampler; NAG leaves it out and stands
    aside for a call that carries reference latents (counted, with the reason)."""
    model = tiny_model()
    arguments, negative = batch([1, 0])
    own = []
    monkeypatch.setattr(SingleStreamDiT, "forward", lambda self, *args, **kwargs: own.append(kwargs) or "model's own")
    calls = []
    references = [torch.randn(1, CHANNELS, 1, 4, 4)]
    assert KREA.guided(model, negative, arguments | {"ref_latents": references}, calls=calls) == "model's own"
    assert calls == [(False, STOOD_ASIDE)] and own[0]["ref_latents"] is references


def test_what_the_model_ignores_nag_ignores_alike():
    """Neo's Krea reads no ControlNet or patch, and its no-reference path passes no mask on."""
    extra = {
        "control": {"input": [torch.randn(4, 9, 64)]},
        "attention_mask": torch.zeros(4, 1, 1),
        "transformer_options": {"patches_replace": {"dit": {("double_block", 0): None}}},
    }
    checks.check_what_the_model_ignores_nag_ignores_alike(KREA, extra)


# --- the pass and the job -------------------------------------------------------------------------------


def test_the_pass_patches_a_clone_and_guides_inside_the_window():
    checks.check_the_pass_guides_a_clone_inside_the_window(KREA, KreaPass, "2 single-stream blocks")


class Krea2Engine:
    """Neo's Krea2 engine as NAG meets it: ``get_learned_conditioning`` takes the reference images only for a
    prompt not marked negative (and otherwise, without references, clears Neo's global reference latents)."""

    sd_checkpoint_info = "krea2"

    def __init__(self, model):
        self.forge_objects = sd_model_of(model).forge_objects
        self.ref_latents_cleared = 0
        self.seen = []

    def get_learned_conditioning(self, prompts):
        self.seen.append((list(prompts), prompts.is_negative_prompt))
        if not prompts.is_negative_prompt:
            self.ref_latents_cleared += 1
        return [conditioning(1, 3 + len(prompt))[0] for prompt in prompts]


def test_the_nag_negative_is_encoded_as_a_negative_prompt():
    """Through the job's own NAG negative encoding, as the engine encodes a negative prompt: text only,
    Neo's reference latents untouched."""
    reset_host()
    shared.sd_model = engine = Krea2Engine(tiny_model())
    p = txt2img(negative_prompt="blurry")
    p.negative_prompts, p.extra_network_data = ["blurry"] * IMAGES, {}
    job = SimpleNamespace(p=p, params=PARAMS, negative=NegativeConditioning())
    nag_pass = KreaPass(job, PassReport(is_hires=False))
    nag_pass.close()
    assert engine.seen == [(["blurry"], True)] and engine.ref_latents_cleared == 0
    assert nag_pass.schedules[0][0].cond.shape == (1, 3 + len("blurry"), TEXT_LAYERS * TEXT_WIDTH)


@pytest.mark.parametrize("ending", ["finished", "interrupted", "raised"])
def test_nothing_is_left_after_any_job(ending):
    arguments, negative = batch([0])
    run_a_job_to_its_end(sd_model_of(tiny_model()), KreaPass, per_image_schedules(negative), arguments, ending)


def test_a_switch_between_sdxl_krea_and_ernie_picks_each_models_pass():
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(forge_model(randomize_outputs(sd1_like_unet()))) is ForgeUNetPass
    assert host.pass_for(sd_model_of(tiny_model())) is KreaPass
    assert host.pass_for(sd_model_of(tiny_ernie())) is not KreaPass
    assert host.pass_for(sd_model_of(tiny_flux("neo"))) is not KreaPass


def test_a_krea_built_otherwise_is_named_not_run():
    sd_model = sd_model_of(tiny_model())
    host = ForgeHost.__new__(ForgeHost)
    del sd_model.forge_objects.unet.model.diffusion_model.blocks[1].attn.gate  # e.g. a build without the output gate
    assert host.pass_for(sd_model) is None
    assert host.unsupported_reason(sd_model) == (
        "NAG runs Forge Neo's Krea 2 as read at 5692d2d1; this SingleStreamDiT is built otherwise, not supported yet"
    )
