"""NAG on Wan 2.1/2.2 (text-to-video, image-to-video, text-to-image) through lib_nag.models.wan, on a
tiny stand-in of Forge Neo's backend/nn/wan.py (tests/forge/backend/nn/wan.py), against the reference
written from the authors' ComfyUI-NAG (tests/reference_wan.py). The helpers here serve Anima's tests
too (tests/test_anima.py): both are cross-attention passes whose rows come from ``HookedLayerRows``."""

from types import SimpleNamespace

import pytest
import torch
from backend.args import dynamic_args
from backend.nn import wan
from backend.patcher.unet import UnetPatcher
from modules import script_callbacks, sd_samplers_common, shared
from reference_wan import reference_wan
from test_flux import assert_guided_as_expected, new_pass, per_image_schedules, randomized, relative
from test_forge import all_hooks_gone, denoiser_step, forge_model
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.models.wan import WanPass
from lib_nag.params import NagParams
from lib_nag.webui.job import NagHost, NagJob
from lib_nag.webui.report import JobReport, PassReport

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
NAG = (PARAMS.scale, PARAMS.tau, PARAMS.alpha)
TEXT, PROMPT_TOKENS, CONCAT = 24, 12, 5
SIZES = {"dim": 32, "ffn_dim": 64, "freq_dim": 16, "text_dim": TEXT, "num_heads": 2, "num_layers": 2, "out_dim": 4, "clip_dim": 8}
FRAMES = {"t2v": 3, "i2v": 3, "t2i": 1}  # latent frames; text-to-image is a one-frame video
KINDS = list(FRAMES)
LAYOUTS = {"cond only": [0], "uncond, cond": [1, 0], "cond, uncond": [0, 1]}
EACH_LAYOUT = pytest.mark.parametrize("chunks", LAYOUTS.values(), ids=LAYOUTS.keys())
EACH_NEGATIVE_LENGTH = pytest.mark.parametrize("negative_tokens", [7, 20], ids=["shorter NAG negative", "longer NAG negative"])


class Wan(SimpleNamespace):
    """What Forge Neo's ``shared.sd_model`` is for a Wan checkpoint (engine class ``Wan``): the patcher
    over a KModel holding the network."""


def tiny_model(kind):
    if kind == "i2v":  # Wan 2.1 I2V: img_emb, image-context cross-attention, a concatenated latent
        return randomized(wan.WanModel(model_type="i2v", in_dim=4 + CONCAT, **SIZES))
    return randomized(wan.WanModel(model_type="t2v", in_dim=4, **SIZES))


@pytest.fixture(autouse=True)
def _no_concat_latent():
    yield
    dynamic_args.pop("concat_latent", None)


def batch(kind, chunks, negative_tokens=7):
    """One model call's arguments as Neo's KModel makes them: one latent row per video and chunk
    (5×6 latents: odd, padded), the timestep σ·1000, ``cond_or_uncond`` and one σ per video; and a NAG
    negative (one row: the video's)."""
    frames, rows, sigmas = FRAMES[kind], len(chunks), torch.rand(1)
    if kind == "i2v":
        dynamic_args["concat_latent"] = torch.randn(1, CONCAT, frames, 5, 6)
    arguments = {
        "x": torch.randn(rows, 4, frames, 5, 6),
        "timestep": sigmas.repeat(rows) * 1000,
        "context": torch.randn(rows, PROMPT_TOKENS, TEXT),
    }
    return arguments | {"transformer_options": {"cond_or_uncond": chunks, "sigmas": sigmas}}, torch.randn(1, negative_tokens, TEXT)


def engine(model, engine_class=Wan):
    return engine_class(forge_objects=SimpleNamespace(unet=UnetPatcher(SimpleNamespace(diffusion_model=model))))


def guided(model, negative, arguments, params=PARAMS, pass_class=WanPass, engine_class=Wan):
    """The model called at step 0 of a pass (inside its window), and the closed pass."""
    shared.sd_model = engine(model, engine_class)
    nag_pass = new_pass(pass_class, negative, params)
    try:
        denoiser_step(nag_pass, 0)
        return model(**arguments), nag_pass
    finally:
        nag_pass.close()


def cond_rows(chunks, images=1):
    return [c * images + j for c, label in enumerate(chunks) if label == 0 for j in range(images)]


def positive_last(arguments, names, chunks, images=1):
    """The call's rows reordered so that the cond chunks come last (ComfyUI's layout), and that order."""
    cond = cond_rows(chunks, images)
    order = [r for r in range(images * len(chunks)) if r not in cond] + cond
    return {name: arguments[name][order] for name in names}, order, [r % images for r in cond]


def reference(model, arguments, negative, guide_image=False):
    chunks = arguments["transformer_options"]["cond_or_uncond"]
    rows, order, images = positive_last(arguments, ("x", "timestep", "context"), chunks)
    out = reference_wan(model, **rows, nag_context=negative[images], nag=NAG, guide_image=guide_image)
    return out[torch.tensor(order).argsort()]


@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
@pytest.mark.parametrize("kind", KINDS)
def test_matches_the_authors_formulation_and_leaves_uncond_rows_alone(kind, chunks, negative_tokens, record_difference):
    model = tiny_model(kind)
    arguments, negative = batch(kind, chunks, negative_tokens)
    out, nag_pass = guided(model, negative, arguments)
    stock = model(**arguments)
    assert_guided_as_expected(out, stock, reference(model, arguments, negative), cond_rows(chunks), record_difference)
    assert nag_pass.report.guided_calls == nag_pass.report.placed == nag_pass.report.calls == 2  # one call per layer


@pytest.mark.parametrize("chunks", [[0], [1, 0]], ids=["cond only", "uncond, cond"])
def test_image_to_video_guides_the_text_part_only(chunks):
    """The image-context part of i2v's cross-attention stays as the host computed it; the authors'
    code would guide it too (Neo passes no CLIP features, so their image part attends over the text)."""
    model = tiny_model("i2v")
    arguments, negative = batch("i2v", chunks)
    out, _pass = guided(model, negative, arguments)
    both_parts = reference(model, arguments, negative, guide_image=True)
    assert relative(out, reference(model, arguments, negative)) <= 1e-5
    assert relative(out, both_parts) > 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_without_a_cond_chunk_or_outside_the_window_the_model_is_the_hosts(kind):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1])
    out, nag_pass = guided(model, negative, arguments)
    assert torch.equal(out, model(**arguments))
    assert nag_pass.nag.guided_calls == 0 and nag_pass.report.calls == 2 and nag_pass.report.placed == 0
    arguments, negative = batch(kind, [1, 0])
    shared.sd_model = engine(model)
    nag_pass = new_pass(WanPass, negative, NagParams(enabled=True, start=0.5))
    denoiser_step(nag_pass, 0)  # before the window
    assert torch.equal(model(**arguments), type(model).forward(model, **arguments))
    nag_pass.close()
    assert nag_pass.report.calls == 0 and all_hooks_gone(model)


@pytest.mark.parametrize("kind", KINDS)
def test_a_nag_negative_equal_to_the_prompt_changes_nothing(kind, record_difference):
    model = tiny_model(kind)
    arguments, _ = batch(kind, [1, 0])
    out, _pass = guided(model, arguments["context"][1:], arguments)
    difference = relative(out, model(**arguments))
    record_difference(difference)
    assert difference <= 1e-5


@pytest.mark.parametrize("kind", KINDS)
def test_scale_one_changes_nothing(kind, record_difference):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1, 0])
    out, nag_pass = guided(model, negative, arguments, NagParams(enabled=True, scale=1.0))
    difference = relative(out, model(**arguments))
    record_difference(difference)
    assert difference <= 1e-6 and nag_pass.report.guided_calls == 2


@pytest.mark.parametrize("kind", KINDS)
def test_a_videos_output_does_not_depend_on_its_position_in_the_batch(kind, record_difference):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1, 0])
    swapped = {**arguments, "transformer_options": {"cond_or_uncond": [0, 1], "sigmas": arguments["transformer_options"]["sigmas"]}}
    swapped |= {name: arguments[name].flip(0) for name in ("x", "timestep", "context")}
    alone = {**arguments, "transformer_options": {"cond_or_uncond": [0], "sigmas": arguments["transformer_options"]["sigmas"]}}
    alone |= {name: arguments[name][1:] for name in ("x", "timestep", "context")}
    last, _ = guided(model, negative, arguments)
    first, _ = guided(model, negative, swapped)
    only, _ = guided(model, negative, alone)
    record_difference(max(relative(first[0], last[1]), relative(only[0], last[1])))
    assert relative(first[0], last[1]) <= 1e-6 and relative(only[0], last[1]) <= 1e-6
    assert torch.equal(first[1], last[0])  # the uncond row: the host's


def test_the_nag_negative_is_the_first_frames_copy_and_goes_through_text_embedding():
    """Neo's batch-size field counts frames: its negative prompts (and so NAG's) hold a copy per frame."""
    model = tiny_model("t2v")
    arguments, negative = batch("t2v", [0])
    embedded = []
    model.text_embedding.register_forward_hook(lambda _m, args, _out: embedded.append(args[0].shape[0]))
    out, nag_pass = guided(model, negative.repeat(4, 1, 1), arguments)
    assert nag_pass.report.guided_calls == 2
    assert embedded == [1, 1]  # the NAG negative's (once for both layers), then the host's context
    assert torch.equal(out, guided(model, negative, arguments)[0])


def test_a_dit_replace_patch_that_runs_the_block_is_guided_the_same():
    model = tiny_model("t2v")
    arguments, negative = batch("t2v", [1, 0])
    expected, _ = guided(model, negative, arguments)
    ran = []

    def patch(args, extra):
        ran.append(args["transformer_options"]["block_index"])
        return extra["original_block"](args)

    arguments["transformer_options"]["patches_replace"] = {"dit": {("double_block", 1): patch}}
    out, _ = guided(model, negative, arguments)
    assert ran == [1] and torch.equal(out, expected)


def test_rows_that_cannot_be_placed_are_counted():
    model = tiny_model("t2v")
    arguments, negative = batch("t2v", [1, 0])
    arguments["transformer_options"]["sigmas"] = torch.rand(3)  # rows that are not chunks × videos
    out, nag_pass = guided(model, negative, arguments)
    assert torch.equal(out, model(**arguments))
    line = JobReport(model="Wan", passes={False: nag_pass.report}).line()
    assert line.startswith("[NAG] not applied on Wan: 0 of 2 cross-attention calls could be placed in the CFG batch")


# --- the pass, the host, the job ----------------------------------------------------------------------


def sample_in_and_after_the_window(model, pass_class, negative, arguments, stock, expected):
    """At step 0 of 10 (inside an end-0.5 window) the model is guided; at step 5 the hooks are gone and
    the model is the host's, bit for bit. Returns the pass."""
    nag_pass = new_pass(pass_class, negative, NagParams(enabled=True, end=0.5))
    try:
        denoiser_step(nag_pass, 0)
        assert torch.equal(model(**arguments), expected)
        denoiser_step(nag_pass, 5)
        assert all_hooks_gone(model)
        assert torch.equal(model(**arguments), stock)
    finally:
        nag_pass.close()
    return nag_pass


@pytest.mark.parametrize("kind", KINDS)
def test_the_pass_hooks_the_model_guides_inside_the_window_and_leaves_nothing(kind):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1, 0])
    stock, (expected, _) = model(**arguments), guided(model, negative, arguments)
    shared.sd_model = engine(model)
    patcher = shared.sd_model.forge_objects.unet
    assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), shared.sd_model) is WanPass
    nag_pass = sample_in_and_after_the_window(model, WanPass, negative, arguments, stock, expected)
    assert shared.sd_model.forge_objects.unet is patcher and not patcher.object_patches  # hooks only, no patch
    assert all_hooks_gone(model) and not script_callbacks.callback_map["callbacks_cfg_denoiser"]
    line = JobReport(model="Wan", passes={False: nag_pass.report}).line()
    assert line == "[NAG] active on Wan: first pass 1/10 steps guided (2 cross-attention calls), 2 cross-attention layers hooked"


def job_with_host(model, negative, engine_class=Wan):
    """A NagJob on a Forge host whose NAG negative is ``negative`` (one row per prompt)."""
    shared.sd_model = engine(model, engine_class)
    host = ForgeHost.__new__(ForgeHost)
    NagHost.__init__(host)
    schedules = per_image_schedules(negative)
    host.negative = SimpleNamespace(encode=lambda *args: schedules, forget=lambda: None)
    return host


def run_job(host, model, arguments, ending, steps=3):
    """A job whose sampling runs ``steps`` model calls, or stops at step 1 (interrupted) or raises there."""
    seen = []

    def sample(*args, **kwargs):
        for step in range(steps):
            denoiser_step(job.pass_, step, total=steps)
            seen.append(model(**arguments))
            if step == 1 and ending != "finished":
                if ending == "raised":
                    raise RuntimeError("out of memory")
                break  # the host's interrupt leaves the sampler loop
        return seen[-1]

    p = SimpleNamespace(sample=sample, is_hr_pass=False, extra_generation_params={})
    job = NagJob(host, p, NagParams(enabled=True))
    job.start_pass()
    if ending == "raised":
        with pytest.raises(RuntimeError, match="out of memory"):
            p.sample()
    else:
        p.sample()
        job.end()
    return job, p


@pytest.mark.parametrize("ending", ["finished", "interrupted", "raised"])
def test_nothing_is_left_after_any_wan_job(ending, capsys):
    model = tiny_model("t2v")
    arguments, negative = batch("t2v", [1, 0])
    host = job_with_host(model, negative)
    job, p = run_job(host, model, arguments, ending)
    assert isinstance(job.report.passes[False], PassReport) and host.live is None
    assert all_hooks_gone(model) and not script_callbacks.callback_map["callbacks_cfg_denoiser"]
    assert torch.equal(model(**arguments), type(model).forward(model, **arguments))
    assert ("NAG scale" in p.extra_generation_params) == (ending != "raised")
    steps = "3/3 steps guided (6" if ending == "finished" else "2/3 steps guided (4"
    assert f"[NAG] active on Wan: first pass {steps} cross-attention calls), 2 cross-attention layers hooked" in capsys.readouterr().out


def test_a_switch_between_sdxl_and_wan_picks_each_models_pass():
    host = ForgeHost.__new__(ForgeHost)
    sdxl = forge_model(randomize_outputs(sd1_like_unet()))
    assert host.pass_for(sdxl) is ForgeUNetPass
    assert host.pass_for(engine(tiny_model("t2v"))) is WanPass
    assert host.pass_for(engine(tiny_model("i2v"))) is WanPass
    assert host.pass_for(sdxl) is ForgeUNetPass


def test_a_wan_without_its_cross_attention_parts_is_not_taken_for_wan():
    model = tiny_model("t2v")
    del model.blocks[1].cross_attn.norm_q
    sd_model = engine(model)
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(sd_model) is None
    assert host.unsupported_reason(sd_model) == "NAG does not know the attention layers of Wan (WanModel)"


def test_wan_2_2s_fast_refiner_reloading_weights_in_place_reprojects_the_nag_negative(monkeypatch):
    """Neo's fast refiner loads the low-noise expert into the same modules (``load_state_dict``); Neo
    builds its models in inference mode, so the in-place copy changes no version counter or pointer."""
    with torch.inference_mode():
        model, low_noise = tiny_model("t2v"), tiny_model("t2v")
        high_noise = {name: tensor.clone() for name, tensor in model.state_dict().items()}
        arguments, negative = batch("t2v", [1, 0])
        fresh = {}
        for refiner_seen in (False, True):
            model.load_state_dict(high_noise)
            shared.sd_model = engine(model)
            nag_pass = new_pass(WanPass, negative)
            denoiser_step(nag_pass, 0)
            model(**arguments)
            model.load_state_dict(low_noise.state_dict())
            monkeypatch.setattr(
                sd_samplers_common, "ORIGINAL_CHECKPOINT", "wan2.2_high_noise.safetensors" if refiner_seen else None, raising=False
            )
            denoiser_step(nag_pass, 1)
            fresh[refiner_seen] = model(**arguments)
            nag_pass.close()
            assert nag_pass.report.guided == {0, 1}
        monkeypatch.setattr(sd_samplers_common, "ORIGINAL_CHECKPOINT", None)
        expected, _ = guided(model, negative, arguments)
    assert torch.equal(fresh[True], expected)
    assert not torch.equal(fresh[False], expected)  # what a stale K⁻/V⁻ cache would give
