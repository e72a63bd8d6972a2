"""NAG on Forge Neo's Flux.2 (Klein) through lib_nag.models.flux2, on the Flux.2 path of the tiny Neo
Flux stand-in (tests/forge/backend/nn/flux_neo.py), against a float64 reference derived from the
authors' Flux pattern (tests/reference_flux2.py). Both Neo forwards are covered: 06d6af9a's, which
divides the timestep by 1000, and v3.5's, which passes it on (NAG replaces ``forward_orig`` and takes
the timestep as either gives it)."""

import pytest
import torch
from backend.diffusion_engine.flux2 import Flux2
from backend.nn import flux_neo
from reference_flux2 import reference_flux2
from test_flux import (
    IMAGES,
    NAG,
    assert_guided_as_expected,
    comfy_order,
    cond_rows,
    flux_pass,
    flux_sd_model,
    guided,
    per_image_schedules,
    randomized,
    relative,
    run_a_job_to_its_end,
    sample_in_and_after_the_window,
    sd_model_of,
)
from test_flux_neo import check_the_nag_negative_keeps_the_references, host_only_inputs
from test_forge import forge_model
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models.flux import STOOD_ASIDE, FluxPass
from lib_nag.models.flux2 import Flux2Modulations, Flux2Pass, flux2_modulations
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.params import NagParams
from lib_nag.webui.report import JobReport

CHANNELS, CONTEXT, PROMPT_TOKENS = 8, 24, 7
KLEIN = {
    "vec_in_dim": None, "hidden_size": 64, "mlp_ratio": 3.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [4, 4, 4, 4], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": False, "txt_ids_dims": [3],
    "global_modulation": True, "mlp_silu_act": True, "ops_bias": False, "default_ref_method": "index", "ref_index_scale": 10.0,
}  # fmt: skip
FORWARDS = {"06d6af9a forward": 1000.0, "v3.5 forward": 1.0}  # the timestep divisor of Neo's forward
EACH_FORWARD = pytest.mark.parametrize("divisor", FORWARDS.values(), ids=FORWARDS.keys())
LAYOUTS = {"cond only": [0], "uncond, cond": [1, 0], "cond, uncond": [0, 1]}
EACH_LAYOUT = pytest.mark.parametrize("chunks", LAYOUTS.values(), ids=LAYOUTS.keys())
EACH_NEGATIVE_LENGTH = pytest.mark.parametrize("negative_tokens", [5, 11], ids=["shorter NAG negative", "longer NAG negative"])


def tiny_klein(divisor=1000.0, **variant):
    """A Klein-shaped Flux.2 (no biases, gated SiLU MLPs, 4 RoPE axes, text ids on axis 3), 8 latent channels."""
    options = KLEIN | variant | {"context_in_dim": CONTEXT, "timestep_divisor": divisor}
    return randomized(flux_neo.IntegratedFluxTransformer2DModel(CHANNELS, CHANNELS, **options))


def klein_batch(chunks, negative_tokens=5, divisor=1000.0, tokens=PROMPT_TOKENS):
    """A call's arguments for ``chunks`` (cond_or_uncond), 2 images of 5×6 latents, and a NAG negative
    per image; the timestep as the forward's Neo gets it (σ·``divisor``)."""
    rows, sigmas = IMAGES * len(chunks), torch.rand(IMAGES)
    arguments = {"x": torch.randn(rows, CHANNELS, 5, 6), "timestep": sigmas.repeat(len(chunks)) * divisor}
    arguments |= {"context": torch.randn(rows, tokens, CONTEXT), "transformer_options": {"cond_or_uncond": chunks, "sigmas": sigmas}}
    return arguments, torch.randn(IMAGES, negative_tokens, CONTEXT)


def klein_guided(model, negative, arguments, **options):
    return guided(model, negative, arguments, modulations_of=flux2_modulations, **options)


def reference(model, arguments, negative, divisor=1000.0, refs=()):
    """The reference on the call's rows in ComfyUI's order (put back afterwards)."""
    order, images = comfy_order(arguments)
    rows = {name: arguments[name][order] for name in ("x", "context")}
    guidance = arguments.get("guidance")
    out = reference_flux2(
        model, **rows, timestep=arguments["timestep"][order] / divisor, nag_context=negative[images], nag=NAG, refs=refs,
        guidance=None if guidance is None else guidance[order],
    )  # fmt: skip
    return out[torch.tensor(order).argsort()]


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_matches_the_reference_and_leaves_other_rows_alone(chunks, negative_tokens, record_difference):
    model = tiny_klein()
    arguments, negative = klein_batch(chunks, negative_tokens)
    calls = []
    out = klein_guided(model, negative, arguments, calls=calls)
    assert_guided_as_expected(out, model(**arguments), reference(model, arguments, negative), cond_rows(chunks), record_difference)
    assert calls == [(True, "")]


@EACH_FORWARD
def test_reference_latents_are_image_tokens_for_either_neo_forward(divisor, neo_dynamic_args, record_difference):
    """Klein's edit references (batch 1, expanded to the call's rows by Neo's forward, ids 10·k on axis 0)
    go through the blocks as image tokens, guided with the image, and Neo's forward cuts them."""
    model = tiny_klein(divisor)
    arguments, negative = klein_batch([1, 0], divisor=divisor)
    neo_dynamic_args["ref_latents"] = refs = [torch.randn(1, CHANNELS, *size) for size in ((6, 4), (3, 5))]
    out = klein_guided(model, negative, arguments)
    expected = reference(model, arguments, negative, divisor, refs)
    assert_guided_as_expected(out, model(**arguments), expected, cond_rows([1, 0]), record_difference)
    neo_dynamic_args["ref_latents"] = None
    assert relative(klein_guided(model, negative, arguments), out) > 1e-3  # the references took part


VARIANTS = {"guidance embedded": {"guidance_embed": True}, "text norm": {"txt_norm": True}}


@pytest.mark.parametrize("variant", VARIANTS.values(), ids=VARIANTS.keys())
def test_neos_flux2_options_match_the_reference(variant, record_difference):
    """Neo's other Flux.2 options: a guidance embedding (added when the call gives guidance) and ``txt_norm``
    before ``txt_in`` (Klein has neither)."""
    model = tiny_klein(**variant)
    arguments, negative = klein_batch([1, 0])
    arguments["guidance"] = torch.full((len(arguments["x"]),), 4.0)
    out = klein_guided(model, negative, arguments)
    assert_guided_as_expected(out, model(**arguments), reference(model, arguments, negative), cond_rows([1, 0]), record_difference)


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_nag_rows_as_text_alone_equal_the_full_nag_stream(chunks, negative_tokens, monkeypatch, record_difference):
    """Flux.2's modulations carry no prompt, so NAG runs its rows' single-stream blocks on their text
    alone; that gives what the authors' full NAG stream (image tokens recomputed) gives."""
    model = tiny_klein()
    arguments, negative = klein_batch(chunks, negative_tokens)
    text_alone = klein_guided(model, negative, arguments)
    monkeypatch.setattr(Flux2Modulations, "text_free", False)
    full_stream = klein_guided(model, negative, arguments)
    record_difference(relative(text_alone, full_stream))
    assert relative(text_alone, full_stream) <= 1e-6
    assert relative(text_alone, model(**arguments)) > 1e-3


def test_scale_one_changes_nothing(record_difference):
    model = tiny_klein()
    arguments, negative = klein_batch([1, 0])
    difference = relative(klein_guided(model, negative, arguments, params=NagParams(enabled=True, scale=1.0)), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-6


def test_a_nag_negative_equal_to_the_prompt_changes_nothing(record_difference):
    model = tiny_klein()
    arguments, _ = klein_batch([0])
    difference = relative(klein_guided(model, arguments["context"], arguments), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-5


def test_an_images_output_does_not_depend_on_its_place_in_the_batch(record_difference):
    model = tiny_klein()
    arguments, negative = klein_batch([1, 0])
    swapped = [1, 0, 3, 2]  # the two images swapped in each chunk
    moved = {name: arguments[name][swapped] for name in ("x", "timestep", "context")}
    options = {"cond_or_uncond": [1, 0], "sigmas": arguments["transformer_options"]["sigmas"][[1, 0]]}
    out = klein_guided(model, negative, arguments)
    out_moved = klein_guided(model, negative[[1, 0]], moved | {"transformer_options": options})
    record_difference(relative(out_moved, out[swapped]))
    assert relative(out_moved, out[swapped]) <= 1e-6


def test_without_a_cond_chunk_or_outside_the_window_the_model_runs_its_own_forward():
    model = tiny_klein()
    arguments, negative = klein_batch([1])
    calls = []
    assert torch.equal(klein_guided(model, negative, arguments, calls=calls), model(**arguments))
    arguments, negative = klein_batch([1, 0])
    assert torch.equal(klein_guided(model, negative, arguments, is_active=lambda options: False, calls=calls), model(**arguments))
    assert calls == []


@pytest.mark.parametrize("extra", ["ControlNet", "attention mask", "post_input patch", "dit replace patch"])
def test_a_call_with_what_only_the_host_runs_gets_the_hosts_forward_orig(extra):
    model = tiny_klein()
    arguments, negative = klein_batch([1, 0])
    arguments |= host_only_inputs(arguments)[extra]
    calls = []
    assert torch.equal(klein_guided(model, negative, arguments, calls=calls), model(**arguments))
    assert calls == [(False, STOOD_ASIDE)]  # counted, and the console says why


# --- the pass, the job, the NAG negative's encoding and recognition --------------------------------------


def test_the_pass_patches_a_clone_and_guides_inside_the_window():
    from modules import shared

    shared.sd_model = sd_model_of(tiny_klein())
    original = shared.sd_model.forge_objects.unet
    model = original.model.diffusion_model
    arguments, negative = klein_batch([1, 0])
    stock = model(**arguments)
    assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), shared.sd_model) is Flux2Pass
    nag_pass = flux_pass(negative, NagParams(enabled=True, end=0.5), Flux2Pass)
    patcher = shared.sd_model.forge_objects.unet
    assert patcher is not original and not original.object_patches and "forward_orig" not in vars(model)
    call, guided_call = lambda: model(**arguments), lambda: klein_guided(model, negative, arguments)
    first = sample_in_and_after_the_window(nag_pass, patcher, call, guided_call, stock)
    assert torch.equal(first[:IMAGES], stock[:IMAGES])
    assert shared.sd_model.forge_objects.unet is original
    assert nag_pass.report.guided == {0} and nag_pass.report.guided_calls == 1
    line = JobReport(model="Flux2", passes={False: nag_pass.report}).line()
    assert line == "[NAG] active on Flux2: first pass 1/10 steps guided (1 model calls), 2 double + 2 single blocks"


@pytest.mark.parametrize("ending", ["finished", "interrupted", "raised"])
def test_nothing_is_left_after_any_flux2_job(ending):
    arguments, negative = klein_batch([0])
    run_a_job_to_its_end(sd_model_of(tiny_klein()), Flux2Pass, per_image_schedules(negative), arguments, ending)


def test_the_nag_negative_leaves_the_edit_references_as_the_prompt_set_them(neo_dynamic_args):
    """Klein's engine sets the references again for every prompt that is not a negative one, from its
    stored references and the img2img image's latent, which the host's prompt has consumed: encoded as a
    positive, the NAG negative would take the img2img image out of the references."""
    engine = Flux2(lambda texts: torch.randn(len(texts), 512, CONTEXT))
    references = [torch.randn(1, CHANNELS, 5, 6), torch.randn(1, CHANNELS, 4, 4)]  # the img2img image, a stitched one
    check_the_nag_negative_keeps_the_references(Flux2Pass, tiny_klein(), engine, references)


def test_a_switch_between_sdxl_flux1_and_flux2_picks_each_models_pass():
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(forge_model(randomize_outputs(sd1_like_unet()))) is ForgeUNetPass
    assert host.pass_for(sd_model_of(tiny_klein())) is Flux2Pass
    assert host.pass_for(flux_sd_model("neo")) is FluxPass
    assert host.pass_for(flux_sd_model("neo-chroma")) is FluxPass
    assert host.pass_for(sd_model_of(tiny_klein(mlp_silu_act=False))) is Flux2Pass  # GELU MLPs run through the blocks' own too


def yak_mlp(model):
    for block in model.single_blocks:
        block.yak_mlp = True


UNSUPPORTED = {
    "a pooled text vector in its modulation": lambda model: setattr(model, "vec_in_dim", 12),
    "no global modulation layers": lambda model: delattr(model, "single_stream_modulation"),
    "image-first double blocks": lambda model: setattr(model.double_blocks[0], "flipped_img_txt", True),
    "the yak MLP": yak_mlp,
}


@pytest.mark.parametrize("variant", UNSUPPORTED.keys())
def test_flux2_variants_nag_does_not_run_are_named(variant):
    sd_model = sd_model_of(tiny_klein())
    UNSUPPORTED[variant](sd_model.forge_objects.unet.model.diffusion_model)
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(sd_model) is None
    assert host.unsupported_reason(sd_model) == (
        f"NAG runs Forge Neo's Flux.2 (Klein); this IntegratedFluxTransformer2DModel has {variant}, not supported yet"
    )
