"""NAG on Flux.1 and Chroma through lib_nag.models.flux, on tiny stand-ins of Forge main's
backend/nn/flux.py and chroma.py and of Forge Neo's Flux.1 (backend/nn/flux_neo.py, Kontext too) and
Chroma (backend/nn/chroma_neo.py),
against the ComfyUI-NAG reference (tests/reference_joint.py)."""

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch
from backend.nn import chroma_neo, flux_neo
from backend.nn.chroma import IntegratedChromaTransformer2DModel
from backend.nn.flux import IntegratedFluxTransformer2DModel
from modules import prompt_parser, script_callbacks, shared
from reference_joint import reference_joint
from test_forge import denoiser_step, forge_model, sd_model_of
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models import flux_blocks
from lib_nag.models.flux import FluxPass, entry_point, flux1_or_chroma, nag_forward
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.params import NagParams
from lib_nag.webui.job import NagHost, NagJob
from lib_nag.webui.report import JobReport, PassReport

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
NAG = (PARAMS.scale, PARAMS.tau, PARAMS.alpha)
IMAGES, T5, POOLED, PROMPT_TOKENS = 2, 32, 12, 7
CHROMAS = ("chroma", "neo-chroma")  # T5 only: the NAG negative is a tensor
SIZES = {"hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 6, 6], "theta": 10000}


def randomized(model):
    """Larger random weights than the default init, so every block changes its input visibly."""
    for parameter in model.parameters():
        parameter.copy_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def tiny_model(kind):
    if kind == "flux":
        return randomized(IntegratedFluxTransformer2DModel(4, POOLED, T5, qkv_bias=True, guidance_embed=True, **SIZES))
    if kind == "neo":
        flux1 = {"patch_size": 2, "qkv_bias": True, "guidance_embed": True, "txt_ids_dims": []}
        return randomized(flux_neo.IntegratedFluxTransformer2DModel(4, 4, POOLED, T5, **flux1, **SIZES))
    if kind == "neo-chroma":
        approximator = {"in_dim": 64, "out_dim": SIZES["hidden_size"], "hidden_dim": 32, "n_layers": 2}
        return randomized(chroma_neo.IntegratedChromaTransformer2DModel(16, 16, T5, **SIZES, patch_size=2, qkv_bias=True, **approximator))
    return randomized(
        IntegratedChromaTransformer2DModel(4, T5, qkv_bias=True, guidance_out_dim=64, guidance_hidden_dim=32, guidance_n_layers=2, **SIZES)
    )


def batch(kind, chunks, negative_tokens=5):
    """A call's arguments for ``chunks`` (cond_or_uncond), 2 images of 5×6 latents (odd: padded), and
    a NAG negative per image."""
    rows, sigmas = IMAGES * len(chunks), torch.rand(IMAGES)
    # As Forge's calc_cond_uncond_batch: the timestep repeated per chunk, ``sigmas`` one per image;
    # Neo's Flux predictor gives the model sigma·1000 (its forward divides by 1000).
    timestep = sigmas.repeat(len(chunks)) * (1000 if kind == "neo" else 1)
    arguments = {"x": torch.randn(rows, 4, 5, 6), "timestep": timestep, "context": torch.randn(rows, PROMPT_TOKENS, T5)}
    options = {"transformer_options": {"cond_or_uncond": chunks, "sigmas": sigmas}}
    if kind in CHROMAS:
        return arguments | options, torch.randn(IMAGES, negative_tokens, T5)
    conditioning = {"y": torch.randn(rows, POOLED), "guidance": torch.full((rows,), 3.5)}
    return arguments | conditioning | options, {
        "crossattn": torch.randn(IMAGES, negative_tokens, T5),
        "vector": torch.randn(IMAGES, POOLED),
    }


def guided(model, negative, arguments, params=PARAMS, is_active=lambda options: True, calls=None, modulations_of=flux1_or_chroma):
    """The model called with NAG's replacement of its entry point in place (what was there set back)."""
    name = entry_point(model)
    before = vars(model).get(name)
    on_call = None if calls is None else lambda guided, why: calls.append((guided, why))
    setattr(model, name, nag_forward(model, lambda: negative, params, is_active, on_call, modulations_of))
    try:
        return model(**arguments)
    finally:
        delattr(model, name)
        if before is not None:
            setattr(model, name, before)


def cond_rows(chunks):
    """The rows of the cond chunks of a call with ``chunks`` (cond_or_uncond) of IMAGES rows each."""
    return [c * IMAGES + j for c, label in enumerate(chunks) if label == 0 for j in range(IMAGES)]


def comfy_order(arguments):
    """The call's rows reordered so that the cond chunks come last (ComfyUI's layout, the references'),
    and the image of each of those cond rows."""
    cond = cond_rows(arguments["transformer_options"]["cond_or_uncond"])
    order = [r for r in range(len(arguments["x"])) if r not in cond] + cond
    return order, [r % IMAGES for r in cond]


def reference(model, kind, arguments, negative, refs=()):
    """The reference on the call's rows in ComfyUI's order (put back afterwards); on Neo with its
    timestep /1000 and the Kontext references ``refs``."""
    order, images = comfy_order(arguments)
    rows = {name: arguments[name][order] for name in ("x", "timestep", "context")}
    rows["timestep"] = rows["timestep"] / (1000 if kind == "neo" else 1)
    rows["refs"] = [ref[order] for ref in refs]
    if kind in CHROMAS:
        out = reference_joint(model, **rows, nag_context=negative[images], nag=NAG)
    else:
        out = reference_joint(
            model, **rows, nag_context=negative["crossattn"][images], nag=NAG, y=arguments["y"][order],
            nag_y=negative["vector"][images], guidance=arguments["guidance"][order],
        )  # fmt: skip
    return out[torch.tensor(order).argsort()]


def relative(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def assert_guided_as_expected(out, stock, expected, cond, record_difference):
    """``out`` within 1e-5 of the reference; its ``cond`` rows changed by NAG, the others bit-identical
    to the model's own output ``stock``."""
    record_difference(relative(out, expected))
    assert relative(out, expected) <= 1e-5
    uncond = [r for r in range(len(out)) if r not in cond]
    assert torch.equal(out[uncond], stock[uncond])
    assert relative(out[cond], stock[cond]) > 1e-3


KINDS = ["flux", "chroma", "neo", "neo-chroma"]
LAYOUTS = {"cond only": [0], "uncond, cond": [1, 0], "cond, uncond": [0, 1]}
EACH_LAYOUT = pytest.mark.parametrize("chunks", LAYOUTS.values(), ids=LAYOUTS.keys())
EACH_NEGATIVE_LENGTH = pytest.mark.parametrize("negative_tokens", [5, 11], ids=["shorter NAG negative", "longer NAG negative"])


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_authors_formulation_and_leaves_uncond_rows_alone(kind, chunks, negative_tokens, record_difference):
    model = tiny_model(kind)
    arguments, negative = batch(kind, chunks, negative_tokens)
    calls = []
    out = guided(model, negative, arguments, calls=calls)
    stock = model(**arguments)

    assert_guided_as_expected(out, stock, reference(model, kind, arguments, negative), cond_rows(chunks), record_difference)
    assert calls == [(True, "")]


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_cond_chunk_or_outside_the_window_the_model_runs_its_own_forward(kind):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1])
    calls = []
    assert torch.equal(guided(model, negative, arguments, calls=calls), model(**arguments))
    arguments, negative = batch(kind, [1, 0])
    assert torch.equal(guided(model, negative, arguments, is_active=lambda options: False, calls=calls), model(**arguments))
    assert calls == []


@pytest.mark.parametrize("kind", KINDS)
def test_a_nag_negative_equal_to_the_prompt_changes_nothing(kind, record_difference):
    model = tiny_model(kind)
    arguments, _ = batch(kind, [0])
    negative = arguments["context"] if kind in CHROMAS else {"crossattn": arguments["context"], "vector": arguments["y"]}
    difference = relative(guided(model, negative, arguments), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_scale_one_changes_nothing(kind, record_difference):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1, 0])
    difference = relative(guided(model, negative, arguments, NagParams(enabled=True, scale=1.0)), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-6


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
@pytest.mark.parametrize("kind", CHROMAS)
def test_chroma_nag_rows_as_text_alone_equal_the_full_nag_stream(kind, chunks, negative_tokens, monkeypatch, record_difference):
    """Chroma's modulations carry no prompt, so NAG runs its rows' single-stream blocks on their text
    alone; that gives what the authors' full NAG stream (image tokens recomputed) gives."""
    model = tiny_model(kind)
    arguments, negative = batch(kind, chunks, negative_tokens)
    text_alone = guided(model, negative, arguments)
    modulations = flux_blocks.NeoChromaModulations if kind == "neo-chroma" else flux_blocks.ChromaModulations
    monkeypatch.setattr(modulations, "text_free", False)
    full_stream = guided(model, negative, arguments)
    record_difference(relative(text_alone, full_stream))
    assert relative(text_alone, full_stream) <= 1e-6
    assert relative(text_alone, model(**arguments)) > 1e-3


# --- the pass: Forge's patcher, object patch and step window -----------------------------------------


def sample_in_and_after_the_window(nag_pass, patcher, call, guided_call, stock):
    """Forge loads the pass's patcher for sampling; at step 0 (inside an end-0.5 window of 10 steps)
    the model is guided, at step 5 it runs its own forward; then the pass ends and Forge unpatches.
    Returns the guided output."""
    patcher.forge_patch_model()
    try:
        denoiser_step(nag_pass, 0)
        first = call()
        assert torch.equal(first, guided_call())
        denoiser_step(nag_pass, 5)
        assert torch.equal(call(), stock)
        return first
    finally:
        nag_pass.close()
        patcher.forge_unpatch_model()


def flux_sd_model(kind):
    return sd_model_of(tiny_model(kind))


def per_image_schedules(negative):
    """One prompt schedule per image for the whole pass: the rows of ``negative`` (a tensor, or a dict of them)."""
    per_image = [{k: v[i] for k, v in negative.items()} for i in range(IMAGES)] if isinstance(negative, dict) else list(negative)
    return [[prompt_parser.ScheduledPromptConditioning(10, cond)] for cond in per_image]


def new_pass(pass_class, negative, params=PARAMS, encodes=None):
    """A ``pass_class`` pass whose job encodes ``negative`` (one row per image) for every step; ``encodes``
    collects the ``as_negative_prompt`` of each encoding."""
    schedules = per_image_schedules(negative)

    def encode(p, params, is_hires, as_negative_prompt):
        if encodes is not None:
            encodes.append(as_negative_prompt)
        return schedules

    job = SimpleNamespace(p=object(), params=params, negative=SimpleNamespace(encode=encode))
    return pass_class(job, PassReport(is_hires=False))


def flux_pass(negative, params=PARAMS, pass_class=FluxPass):
    """A FluxPass (or ``pass_class``) whose job encodes ``negative`` (one row per image) for every step."""
    schedules = per_image_schedules(negative)
    job = SimpleNamespace(p=object(), params=params, negative=SimpleNamespace(encode=lambda *_arguments: schedules))
    return pass_class(job, PassReport(is_hires=False))


@pytest.mark.parametrize("kind", KINDS)
def test_the_pass_patches_a_clone_and_guides_inside_the_window(kind):
    shared.sd_model = flux_sd_model(kind)
    original = shared.sd_model.forge_objects.unet
    model = original.model.diffusion_model
    arguments, negative = batch(kind, [1, 0])
    stock = model(**arguments)
    assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), shared.sd_model) is FluxPass
    nag_pass = flux_pass(negative, NagParams(enabled=True, end=0.5))
    patcher = shared.sd_model.forge_objects.unet
    assert patcher is not original and not original.object_patches and entry_point(model) not in vars(model)
    first = sample_in_and_after_the_window(nag_pass, patcher, lambda: model(**arguments), lambda: guided(model, negative, arguments), stock)
    assert torch.equal(first[:IMAGES], stock[:IMAGES])
    assert shared.sd_model.forge_objects.unet is original
    assert nag_pass.report.guided == {0} and nag_pass.report.guided_calls == 1
    line = JobReport(model="Flux", passes={False: nag_pass.report}).line()
    assert line == "[NAG] active on Flux: first pass 1/10 steps guided (1 model calls), 2 double + 2 single blocks"
    again = flux_pass(negative)  # Forge's unpatch left the model's own bound forward on it
    assert again.hooked
    hires = flux_pass(negative)  # a second pass on a patcher that already carries NAG's patch
    assert hires.hooked
    hires.close()
    again.close()


def test_the_pass_stands_aside_when_another_extension_replaced_the_forward():
    shared.sd_model = flux_sd_model("flux")
    shared.sd_model.forge_objects.unet.add_object_patch("diffusion_model.forward", lambda *args, **kwargs: None)
    _arguments, negative = batch("flux", [0])
    nag_pass = flux_pass(negative)
    assert not nag_pass.hooked
    assert nag_pass.report.skipped == "another extension replaces the IntegratedFluxTransformer2DModel forward, which NAG would have to run"
    nag_pass.close()


def test_rows_that_cannot_be_placed_are_counted(capsys):
    shared.sd_model = flux_sd_model("flux")
    arguments, negative = batch("flux", [1, 0])
    arguments["transformer_options"]["sigmas"] = torch.rand(3)  # rows that are not chunks × images
    nag_pass = flux_pass(negative)
    patcher = shared.sd_model.forge_objects.unet
    patcher.forge_patch_model()
    try:
        denoiser_step(nag_pass, 0)
        model = patcher.model.diffusion_model
        assert torch.equal(model(**arguments), type(model).forward(model, **arguments))
    finally:
        nag_pass.close()
        patcher.forge_unpatch_model()
    line = JobReport(model="Flux", passes={False: nag_pass.report}).line()
    assert line.startswith("[NAG] not applied on Flux: 0 of 1 model calls could be placed in the CFG batch")


def test_a_switch_between_sdxl_and_flux_picks_each_models_pass():
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(forge_model(randomize_outputs(sd1_like_unet()))) is ForgeUNetPass
    assert host.pass_for(flux_sd_model("chroma")) is FluxPass
    assert host.pass_for(flux_sd_model("flux")) is FluxPass


def test_another_hosts_flux_implementation_is_named_not_run():
    """Forge Neo's Flux is a ComfyUI port (``forward_orig``, other block signatures)."""
    comfy_style = flux_sd_model("flux")
    model = comfy_style.forge_objects.unet.model.diffusion_model
    model.forward_orig = model.inner_forward
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(comfy_style) is None
    assert host.unsupported_reason(comfy_style) == (
        "NAG runs Forge's own Flux and Chroma models; this host's IntegratedFluxTransformer2DModel is another one, not supported yet"
    )


def test_a_forge_main_structure_with_reference_latents_is_named_not_run():
    """An older Neo built Kontext on Forge main's forward → inner_forward: NAG's run of that forward
    would leave the reference latents out."""
    sd_model = flux_sd_model("flux")
    model = sd_model.forge_objects.unet.model.diffusion_model
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(model), "forward", lambda self, x, timestep, context, y, guidance=None, ref_latents=None, **kwargs: None)
        assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), sd_model) is None


ENDINGS = pytest.mark.parametrize("ending", ["finished", "interrupted", "raised"])


def run_a_job_to_its_end(sd_model, pass_class, schedules, arguments, ending):
    """One job with NAG on ``sd_model`` (Forge's patcher over a whole-model family), ``finished``,
    ``interrupted`` or ``raised`` in its second step, then checks that the job's ``p.sample`` guard left
    nothing: the pass's patcher gone, the model unpatched, no callback registered, the infotext only if
    sampling returned."""
    shared.sd_model = sd_model
    original = sd_model.forge_objects.unet
    model = original.model.diffusion_model
    host = ForgeHost.__new__(ForgeHost)
    NagHost.__init__(host)
    host.negative = SimpleNamespace(encode=lambda *args: schedules, forget=lambda: None)
    seen = []

    def sample(*args, **kwargs):
        patcher = shared.sd_model.forge_objects.unet
        patcher.forge_patch_model()
        try:
            for step in range(3):
                denoiser_step(job.pass_, step, total=3)
                seen.append(model(**arguments))
                if step == 1 and ending != "finished":
                    if ending == "raised":
                        raise RuntimeError("out of memory")
                    break  # the host's interrupt leaves the sampler loop
        finally:
            patcher.forge_unpatch_model()
        return seen[-1]

    p = SimpleNamespace(sample=sample, is_hr_pass=False, extra_generation_params={})
    job = NagJob(host, p, NagParams(enabled=True))
    job.start_pass()
    assert type(job.pass_) is pass_class
    if ending == "raised":
        with pytest.raises(RuntimeError, match="out of memory"):
            p.sample()
    else:
        p.sample()
        job.end()
    assert shared.sd_model.forge_objects.unet is original and host.live is None
    assert not script_callbacks.callback_map["callbacks_cfg_denoiser"]
    own = type(model).forward(model, **arguments)
    assert torch.equal(model(**arguments), own)  # the model's own forward again
    assert relative(seen[0], own) > 1e-3  # guided while the job ran
    assert ("NAG scale" in p.extra_generation_params) == (ending != "raised")


@ENDINGS
def test_nothing_is_left_after_any_flux_job(ending):
    arguments, negative = batch("flux", [0])
    run_a_job_to_its_end(flux_sd_model("flux"), FluxPass, per_image_schedules(negative), arguments, ending)


def test_nags_forward_left_on_a_loaded_model_is_inert_and_keeps_no_pass_alive():
    """Forge unpatches only when it loads another patcher: until then NAG's forward stays on the model."""
    shared.sd_model = flux_sd_model("flux")
    arguments, negative = batch("flux", [0])
    nag_pass = flux_pass(negative)
    patcher = shared.sd_model.forge_objects.unet
    model = patcher.model.diffusion_model
    patcher.forge_patch_model()
    denoiser_step(nag_pass, 0)
    nag_pass.close()
    gone = weakref.ref(nag_pass)
    del nag_pass
    gc.collect()
    assert gone() is None
    assert entry_point(model) in vars(model)  # still patched: the host has not unloaded it
    assert torch.equal(model(**arguments), type(model).forward(model, **arguments))
    patcher.forge_unpatch_model()
