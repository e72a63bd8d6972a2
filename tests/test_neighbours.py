"""NAG beside the extensions that hook the same layers (issue #9), each stood in from its source
(tests/neighbours): NAG at scale 1 leaves the neighbour's image as it is, NAG on changes it, every
module is left as the neighbour alone leaves it, and the console and infotext say what NAG guided."""

import pytest
import torch
from adetailer import ADetailer
from animatediff import AnimateDiff
from controlnet_ip_adapter import ControlNetIPAdapter
from fake_models import make_sd_model
from harness import load, reset_host, run, script_runner, txt2img
from modules import script_callbacks, shared
from regional_prompter import RegionalPrompter, hook_forwards, latent_mode_callback
from test_a1111 import load_script_module
from test_forge import IMAGES, denoiser_step, forge_model, new_pass, unet_call
from tiled_diffusion import TiledDiffusion
from unets import randomize_outputs, sd1_like_unet

from lib_nag.attention import CrossAttentionNag
from lib_nag.hosts import HOST
from lib_nag.params import NagParams
from lib_nag.webui.report import JobReport

NAG_ON = [True, 5.0, 2.5, 0.25, 0.0, 1.0, "", "Both passes"]
NAG_AT_1 = [True, 1.0, 2.5, 0.25, 0.0, 1.0, "", "Both passes"]


@pytest.fixture(autouse=True)
def host():
    reset_host()
    load(make_sd_model("sd1"))
    yield
    assert HOST.live is None


def job(neighbours, nag=None, nag_first=False, **fields):
    """One txt2img job with the neighbour scripts (and NAG before or after them)."""
    scripts = [(neighbour, []) for neighbour in neighbours]
    if nag is not None:
        scripts.insert(0 if nag_first else len(scripts), (load_script_module().NagScript(), nag))
    runner, script_args = script_runner(*scripts)
    return run(txt2img(runner, script_args, **fields))


def same(a, b):
    return all(torch.equal(x, y) for x, y in zip(a.images, b.images, strict=True))


def forward_kind(module):
    """What runs a module: its class forward, or an instance forward (as a description)."""
    forward = vars(module).get("forward")
    if forward is None:
        return None
    return ("bound", forward.__func__.__qualname__) if hasattr(forward, "__func__") else ("function", forward.__qualname__)


def unet_state():
    """Every UNet module's forward and hook counts."""
    unet = shared.sd_model.model.diffusion_model
    return [(name, forward_kind(m), len(m._forward_hooks), len(m._forward_pre_hooks)) for name, m in unet.named_modules()]


def nag_line(out):
    return [line for line in out.splitlines() if line.startswith("[NAG]")]


REGIONS = {"prompt": "green hair BREAK red blouse", "negative_prompt": "ugly BREAK blurry", "steps": 3}


@pytest.mark.parametrize("nag_first", [False, True], ids=["NAG after", "NAG before"])
def test_regional_prompter(nag_first, capsys):
    plain = job([], **REGIONS)
    alone = job([RegionalPrompter()], **REGIONS)
    state = unet_state()
    assert not same(alone, plain)
    at_1 = job([RegionalPrompter()], NAG_AT_1, nag_first, **REGIONS)
    assert same(at_1, alone)  # Regional Prompter still runs, untouched
    capsys.readouterr()
    on = job([RegionalPrompter()], NAG_ON, nag_first, **REGIONS)
    assert not same(on, alone) and "NAG scale: 5.0" in on.infotexts[0]
    assert nag_line(capsys.readouterr().out) == [
        "[NAG] active on SD1: first pass 3/3 steps guided (21 cross-attention calls), 7 cross-attention layers hooked"
    ]
    assert unet_state() == state


def test_regional_prompter_removal_never_removes_nag_hooks_mid_job():
    """Regional Prompter removes with ``del module.forward``; NAG installs no forward to lose."""
    attn2 = [m for n, m in shared.sd_model.model.diffusion_model.named_modules() if n.endswith(".attn2")]

    def remove_at_step_1(params):
        if params.denoiser.step == 1:
            hook_forwards(shared.sd_model.model.diffusion_model, remove=True)
            assert all(m.to_q._forward_hooks for m in attn2)

    script_callbacks.on_cfg_denoiser(remove_at_step_1)
    assert "NAG scale: 5.0" in job([RegionalPrompter()], NAG_ON, **REGIONS).infotexts[0]


TILES = {"width": 128, "height": 128, "steps": 2, "batch_size": 2, "prompt": ["a cat", "a dog"], "negative_prompt": ["ugly", "bad"]}


def test_tiled_diffusion_guides_every_tile_row_with_its_images_negative(monkeypatch, capsys):
    plain = job([], **TILES)
    alone = job([TiledDiffusion()], **TILES)
    assert not same(alone, plain)
    assert same(job([TiledDiffusion()], NAG_AT_1, **TILES), alone)

    calls = []
    real_begin = CrossAttentionNag.begin_call

    def begin(nag, x, positive):
        if positive is not None:
            calls.append((x.shape[0], positive.rows.tolist(), positive.negative_index.tolist()))
        real_begin(nag, x, positive)

    monkeypatch.setattr(CrossAttentionNag, "begin_call", begin)
    capsys.readouterr()
    on = job([TiledDiffusion()], NAG_ON, **TILES)
    assert not same(on, alone) and "NAG scale: 5.0" in on.infotexts[0]
    # x_in rows: cond a cat, cond a dog, uncond ugly, uncond bad; 9 tiles in batches of 4, 4 and 1.
    assert {(rows, tuple(r), tuple(n)) for rows, r, n in calls} == {
        (16, (0, 1, 4, 5, 8, 9, 12, 13), (0, 1) * 4),
        (4, (0, 1), (0, 1)),
    }
    assert nag_line(capsys.readouterr().out) == [
        "[NAG] active on SD1: first pass 2/2 steps guided (42 cross-attention calls), 7 cross-attention layers hooked"
    ]


def test_tiled_diffusion_with_the_prompt_as_nag_negative_is_unchanged(record_difference):
    fields = {**TILES, "prompt": ["a cat", "a cat"]}
    alone = job([TiledDiffusion()], **fields)
    same_negative = job([TiledDiffusion()], [True, 5.0, 2.5, 0.25, 0.0, 1.0, "a cat", "Both passes"], **fields)
    difference = max(((a - b).abs().max() / a.abs().max()).item() for a, b in zip(same_negative.images, alone.images, strict=True))
    record_difference(difference, "relative")
    assert difference <= 1e-5


@pytest.mark.parametrize("nag_first", [False, True], ids=["NAG after", "NAG before"])
def test_controlnet_ip_adapter(nag_first, capsys):
    fields = {"steps": 3, "batch_size": 2, "prompt": ["a cat", "a dog"]}
    plain = job([], **fields)
    alone = job([ControlNetIPAdapter()], **fields)
    state = unet_state()
    assert not same(alone, plain)
    assert same(job([ControlNetIPAdapter()], NAG_AT_1, nag_first, **fields), alone)
    capsys.readouterr()
    on = job([ControlNetIPAdapter()], NAG_ON, nag_first, **fields)
    assert not same(on, alone) and "NAG scale: 5.0" in on.infotexts[0]
    assert "(21 cross-attention calls)" in nag_line(capsys.readouterr().out)[0]
    assert unet_state() == state  # IP-Adapter's own restored forwards, and nothing of NAG's


def test_nag_stands_aside_where_rows_cannot_be_placed_and_says_so(capsys):
    """AnimateDiff-shaped windows: the UNet gets gathered copies of a subset of x_in's rows."""
    fields = {"steps": 2, "batch_size": 2, "prompt": ["a cat", "a dog"]}
    alone = job([AnimateDiff(window=1)], **fields)
    capsys.readouterr()
    with_nag = job([AnimateDiff(window=1)], NAG_ON, **fields)
    assert same(with_nag, alone) and "NAG" not in with_nag.infotexts[0]
    assert nag_line(capsys.readouterr().out) == [
        "[NAG] not applied on SD1: 0 of 28 cross-attention calls could be placed in the CFG batch "
        "(another extension calls the UNet with its own batches, tiles or row order)"
    ]


@pytest.mark.parametrize("installed", ["before NAG", "after NAG"])
def test_regional_prompter_on_forge(installed):
    """On Forge, Regional Prompter's instance forwards sit on ``forge_objects.unet.model``'s attn2
    modules, and the uncond half comes first; the transformer block calls attn2 as a module."""
    unet = randomize_outputs(sd1_like_unet())
    shared.sd_model = forge_model(unet)
    context = torch.randn(2 * IMAGES, 154, 768)
    plain, *_ = unet_call([1, 0], context)
    hook_forwards(unet, uncond_first=True)
    alone, *_ = unet_call([1, 0], context)
    assert not torch.equal(alone, plain)
    outputs = {}
    guided_calls = []
    for name, params in (("at 1", NagParams(enabled=True, scale=1.0)), ("on", NagParams(enabled=True))):
        if installed == "after NAG":
            hook_forwards(unet, remove=True)
        nag_pass = new_pass(params=params)
        if installed == "after NAG":
            hook_forwards(unet, uncond_first=True)
        try:
            denoiser_step(nag_pass, 0)
            outputs[name], *_ = unet_call([1, 0], context)
        finally:
            nag_pass.close()
        guided_calls.append(nag_pass.report.guided_calls)
        line = JobReport(model="SD1", passes={False: nag_pass.report}).line()
        assert line == "[NAG] active on SD1: first pass 1/10 steps guided (7 cross-attention calls), 7 cross-attention layers hooked"
    assert torch.equal(outputs["at 1"], alone)
    assert torch.equal(outputs["on"][:IMAGES], alone[:IMAGES]) and not torch.equal(outputs["on"][IMAGES:], alone[IMAGES:])
    attn2 = [m for n, m in unet.named_modules() if n.endswith(".attn2")]
    assert all(forward_kind(m) == ("function", "hook_forward.<locals>.forward") for m in attn2)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())
    assert guided_calls == [7, 7]


def test_adetailer_inner_jobs_run_without_nag_hooks():
    """ADetailer's inpaint jobs run from postprocess_image, before the outer job's postprocess: NAG's
    hooks are gone by then (they end with sampling), so those jobs are the host's own."""
    seen = []
    script_callbacks.on_cfg_denoiser(
        lambda params: seen.append((getattr(params.denoiser.p, "_ad_inner", False), HOST.live is not None, hooked_attn2()))
    )
    without, with_nag = ADetailer(), ADetailer()
    job([without], steps=2)
    job([with_nag], NAG_ON, steps=2)
    assert {live for inner, live, _ in seen if inner} == {False} and {hooked for inner, _, hooked in seen if inner} == {False}
    assert any(hooked for inner, _, hooked in seen if not inner)
    assert [len(without.inner_jobs), len(with_nag.inner_jobs)] == [1, 1]


def hooked_attn2():
    return any(m.to_q._forward_hooks for n, m in shared.sd_model.model.diffusion_model.named_modules() if n.endswith(".attn2"))


def test_a_unet_replacement_that_bypasses_attn2_is_named(monkeypatch, capsys):
    """A1111's sd_unet (TensorRT) replaces UNetModel.forward; no attn2 ever runs."""
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    monkeypatch.setattr(UNetModel, "forward", lambda self, x, timesteps=None, context=None, **kwargs: torch.zeros_like(x))
    processed = job([], NAG_ON, steps=2)
    assert "NAG" not in processed.infotexts[0]
    assert nag_line(capsys.readouterr().out) == [
        "[NAG] not applied on SD1: no hooked cross-attention layer ran (a UNet replacement such as TensorRT bypasses them)"
    ]


@pytest.mark.parametrize("negatives", ["one NAG negative", "a negative per image"])
def test_regional_prompter_latent_mode(negatives, capsys):
    """Latent mode turns BREAK into AND, turns batch_cond_uncond off and reorders the cond rows in
    place: harmless when every image has the same NAG negative; otherwise NAG cannot tell which
    image a row belongs to, so it stands aside for those calls and says so."""
    shared.opts.batch_cond_uncond = False
    script_callbacks.on_cfg_denoiser(latent_mode_callback(areas=2))
    prompts = ["green hair AND red blouse", "blue hair AND a hat"]
    fields = {"steps": 2, "batch_size": 2, "prompt": prompts, "negative_prompt": ["ugly", "bad"]}
    args = [True, 5.0, 2.5, 0.25, 0.0, 1.0, "glasses" if negatives == "one NAG negative" else "", "Both passes"]
    processed = job([], args, **fields)
    line = nag_line(capsys.readouterr().out)[0]
    if negatives == "one NAG negative":
        assert "NAG scale: 5.0" in processed.infotexts[0] and line.startswith("[NAG] active on SD1: first pass 2/2 steps guided")
    else:
        assert "NAG" not in processed.infotexts[0]
        assert line.startswith("[NAG] not applied on SD1: 0 of 28 cross-attention calls could be placed")


def test_animatediff_with_one_window_is_guided(capsys):
    fields = {"steps": 2, "batch_size": 2, "prompt": ["a cat", "a dog"]}
    alone = job([AnimateDiff(window=2)], **fields)
    assert same(job([AnimateDiff(window=2)], NAG_AT_1, **fields), alone)
    capsys.readouterr()
    on = job([AnimateDiff(window=2)], NAG_ON, **fields)
    assert not same(on, alone) and "(14 cross-attention calls)" in nag_line(capsys.readouterr().out)[0]


def test_cfg_1_keeps_the_uncond_rows_for_a_neighbour_that_runs_the_denoiser():
    """AnimateDiff installs its inner-model forward from a ``cfg_denoiser`` callback and its windows
    index the uncond frames: at CFG 1 NAG must not drop them (it checks as each call runs)."""
    fields = {"steps": 2, "batch_size": 2, "prompt": ["a cat", "a dog"], "cfg_scale": 1.0}
    assert same(job([AnimateDiff(window=1)], NAG_ON, **fields), job([AnimateDiff(window=1)], **fields))
