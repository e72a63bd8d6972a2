"""NAG on Z-Image and Lumina 2 through lib_nag.models.nextdit, on a tiny stand-in of Forge Neo's NextDiT
(tests/forge/backend/nn/lumina.py), against a float64 reference written from the authors' single-stream
rule (tests/reference_nextdit.py)."""

from functools import partial
from types import SimpleNamespace
from typing import ClassVar

import pytest
import single_stream as checks
import torch
from backend.nn import lumina
from backend.nn.flux import IntegratedFluxTransformer2DModel
from backend.patcher.unet import UnetPatcher
from modules import shared
from reference_nextdit import reference_nextdit
from single_stream import IMAGES, Case
from test_flux import (
    EACH_LAYOUT,
    EACH_NEGATIVE_LENGTH,
    ENDINGS,
    SIZES,
    new_pass,
    per_image_schedules,
    randomized,
    run_a_job_to_its_end,
)
from test_forge import forge_model, sd_model_of
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models.flux import FluxPass
from lib_nag.models.nextdit import STOOD_ASIDE, NextDiTPass, nag_forward
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.params import NagParams
from lib_nag.webui.conditioning import NegativeConditioning
from lib_nag.webui.report import PassReport

PROMPT_TOKENS = 7
SHAPES = {  # Lumina 2: GQA (3 query heads per key/value head), no padding; Z-Image: Linear adaLN, ×1000 time, pads to ×4 here (×32 in Neo)
    "lumina2": {"dim": 96, "n_heads": 6, "n_kv_heads": 2, "cap_feat_dim": 24, "axes_dims": [4, 6, 6], "ffn_dim_multiplier": 4.0},
    "zimage": {
        "dim": 256, "n_heads": 4, "n_kv_heads": 4, "cap_feat_dim": 32, "axes_dims": [16, 24, 24], "ffn_dim_multiplier": 8 / 3,
        "rope_theta": 256.0, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 4,
    },
}  # fmt: skip
KINDS = list(SHAPES)
EACH_KIND = pytest.mark.parametrize("kind", KINDS)


def tiny_model(kind):
    """2 context-refiner, 2 noise-refiner and 2 main layers; latents of 4 channels."""
    return randomized(lumina.NextDiT(patch_size=2, in_channels=4, n_layers=2, multiple_of=32, qk_norm=True, **SHAPES[kind]))


def batch(kind, chunks, negative_tokens=3):
    """A call's arguments for ``chunks`` (cond_or_uncond): 2 images of 5×6 latents (padded to 6×6: 9
    patches, on Z-Image 3 image pad tokens more), captions of 7 tokens (Z-Image: padded to 8), and a NAG
    negative per image."""
    rows, sigmas, width = IMAGES * len(chunks), torch.rand(IMAGES), SHAPES[kind]["cap_feat_dim"]
    arguments = {
        "x": torch.randn(rows, 4, 5, 6), "timesteps": sigmas.repeat(len(chunks)), "context": torch.randn(rows, PROMPT_TOKENS, width),
        "transformer_options": {"cond_or_uncond": chunks, "sigmas": sigmas},
    }  # fmt: skip
    return arguments, torch.randn(IMAGES, negative_tokens, width)


CASES = {kind: Case(partial(tiny_model, kind), partial(batch, kind), nag_forward, reference_nextdit) for kind in KINDS}


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
@EACH_KIND
def test_matches_the_authors_single_stream_rule_and_leaves_uncond_rows_alone(kind, chunks, negative_tokens, record_difference):
    checks.check_guided_as_the_reference(CASES[kind], chunks, negative_tokens, record_difference)


@EACH_NEGATIVE_LENGTH
@EACH_KIND
def test_nag_rows_as_text_alone_equal_the_full_nag_stream(kind, negative_tokens, record_difference):
    """NextDiT's modulation reads the timestep only, so NAG runs its rows as their text alone with the
    positive rows' image q/k/v; in float32 that gives what the whole ``[NAG text; image]`` stream gives."""
    checks.check_text_alone_equals_the_full_nag_stream(CASES[kind], [1, 0], negative_tokens, record_difference)


@EACH_KIND
def test_without_a_cond_chunk_or_outside_the_window_the_model_runs_its_own_forward(kind):
    checks.check_the_model_runs_its_own_forward_without_a_cond_chunk_or_outside_the_window(CASES[kind])


@EACH_KIND
def test_a_nag_negative_equal_to_the_prompt_changes_nothing(kind, record_difference):
    checks.check_a_nag_negative_equal_to_the_prompt_changes_nothing(CASES[kind], record_difference)


@EACH_KIND
def test_scale_one_changes_nothing(kind, record_difference):
    checks.check_scale_one_changes_nothing(CASES[kind], record_difference)


@EACH_KIND
def test_an_images_output_does_not_depend_on_its_place_in_the_batch(kind, record_difference):
    checks.check_an_images_output_does_not_depend_on_its_place_in_the_batch(CASES[kind], record_difference)


def host_only_inputs(kind, arguments):
    """Inputs NAG's run of the layers would not carry (this Neo's NextDiT reads the mask and ignores the rest;
    later builds may not)."""
    options = arguments["transformer_options"]
    return {
        "attention mask": {"attention_mask": torch.zeros(len(arguments["x"]), 1, 1, 1)},
        "ControlNet": {"control": {"input": [torch.randn(len(arguments["x"]), 9, SHAPES[kind]["dim"])]}},
        "dit replace patch": {"transformer_options": options | {"patches_replace": {"dit": {("double_block", 0): None}}}},
        "RoPE options": {"transformer_options": options | {"rope_options": {"scale_x": 2.0}}},
    }


@pytest.mark.parametrize("extra", ["attention mask", "ControlNet", "dit replace patch", "RoPE options"])
def test_a_call_with_what_only_the_host_runs_gets_the_hosts_forward(extra):
    model = tiny_model("zimage")
    arguments, negative = batch("zimage", [1, 0])
    arguments |= host_only_inputs("zimage", arguments)[extra]
    calls = []
    assert torch.equal(CASES["zimage"].guided(model, negative, arguments, calls=calls), model(**arguments))
    assert calls == [(False, STOOD_ASIDE)]  # counted, and the console says why


# --- the pass: encoding, Forge's patcher, the step window, recognition -------------------------------


def nextdit_sd_model(kind):
    """What Forge Neo's sd_model holds for a Z-Image or Lumina 2 checkpoint."""
    return sd_model_of(tiny_model(kind))


@EACH_KIND
def test_the_pass_patches_a_clone_and_guides_inside_the_window(kind):
    checks.check_the_pass_guides_a_clone_inside_the_window(CASES[kind], NextDiTPass, "2 context-refiner + 2 single-stream layers")


def test_the_pass_stands_aside_when_another_extension_replaced_the_forward():
    shared.sd_model = nextdit_sd_model("lumina2")
    shared.sd_model.forge_objects.unet.add_object_patch("diffusion_model.forward", lambda *args, **kwargs: None)
    nag_pass = new_pass(NextDiTPass, batch("lumina2", [0])[1])
    assert not nag_pass.hooked
    assert nag_pass.report.skipped == "another extension replaces the NextDiT forward, which NAG would have to run"
    nag_pass.close()


class LuminaEngine:
    """What Neo's Lumina2 engine does with a prompt batch (gemma_engine.py): the system template chosen by
    ``is_negative_prompt`` (read off the batch: a plain list has none), then one tensor per prompt."""

    templates: ClassVar = {False: "You are an assistant designed to generate anime images ...", True: "... generate low-quality images ..."}

    def __init__(self):
        self.encoded = []

    def get_learned_conditioning(self, prompts):
        self.encoded += [f"{self.templates[prompts.is_negative_prompt]}\n{prompt}" for prompt in prompts]
        return torch.randn(len(prompts), 5, SHAPES["lumina2"]["cap_feat_dim"])


def test_the_nag_negative_is_encoded_as_the_host_encodes_its_negative_prompt():
    """Lumina 2's engine gives a negative prompt its negative system template, as for its CFG negative."""
    engine = LuminaEngine()
    shared.sd_model = SimpleNamespace(**vars(nextdit_sd_model("lumina2")), get_learned_conditioning=engine.get_learned_conditioning)
    p = SimpleNamespace(
        negative_prompts=["blurry"] * IMAGES, sampler_name=None, steps=10, width=64, height=64, extra_network_data={},
        get_conds_with_caching=lambda function, prompts, steps, caches, networks, hires_steps: function(shared.sd_model, prompts, steps),
    )  # fmt: skip
    job = SimpleNamespace(p=p, params=NagParams(enabled=True, negative_prompt="watermark"), negative=NegativeConditioning())
    nag_pass = NextDiTPass(job, PassReport(is_hires=False))
    nag_pass.close()
    assert engine.encoded == [f"{LuminaEngine.templates[True]}\nwatermark"]


@ENDINGS
def test_nothing_is_left_after_any_nextdit_job(ending):
    arguments, negative = batch("zimage", [0])
    run_a_job_to_its_end(nextdit_sd_model("zimage"), NextDiTPass, per_image_schedules(negative), arguments, ending)


def test_a_switch_between_sdxl_flux_and_nextdit_picks_each_models_pass():
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(forge_model(randomize_outputs(sd1_like_unet()))) is ForgeUNetPass
    assert host.pass_for(nextdit_sd_model("zimage")) is NextDiTPass
    flux = SimpleNamespace(diffusion_model=IntegratedFluxTransformer2DModel(4, 12, 32, qkv_bias=True, guidance_embed=True, **SIZES))
    assert host.pass_for(SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(flux)))) is FluxPass
    assert host.pass_for(nextdit_sd_model("lumina2")) is NextDiTPass


def nunchaku(model):
    """What Neo's ``patch_nunchaku_zimage`` does to the classes: fused attention, a renamed model class."""
    attention_class = type("NunchakuZImageAttention", (lumina.JointAttention,), {})
    for block in (*model.context_refiner, *model.noise_refiner, *model.layers):
        block.attention.__class__ = attention_class
    model.__class__ = type("NunchakuZImage2DModel", (lumina.NextDiT,), {})


def another_build(model):
    """A NextDiT whose forward takes other arguments (NAG's run would not match it)."""
    model.__class__ = type("NextDiT", (lumina.NextDiT,), {"forward": lambda self, x, timesteps, context, **kwargs: None})


NUNCHAKU = "NAG does not run Nunchaku (SVDQuant) Z-Image: its attention fuses the projections, qk-norm and RoPE"
OTHER = "NAG runs Forge Neo's own NextDiT (Z-Image, Lumina 2); this host's NextDiT is another build, not supported yet"
POOLED = "NAG runs Z-Image and Lumina 2; a NextDiT with a pooled text embedding (its modulation carries the prompt) is not supported"
VARIANTS = {
    "Nunchaku": (nunchaku, NUNCHAKU),
    "another build": (another_build, OTHER),
    "pooled text": (lambda model: setattr(model, "clip_text_pooled_proj", torch.nn.Identity()), POOLED),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_nextdit_variants_nag_does_not_run_are_named(variant):
    sd_model = nextdit_sd_model("zimage")
    change, reason = VARIANTS[variant]
    change(sd_model.forge_objects.unet.model.diffusion_model)
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(sd_model) is None
    assert host.unsupported_reason(sd_model) == reason
