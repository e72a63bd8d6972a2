"""Smoke test of the A1111 v1.10.1 stand-in (tests/a1111): whole jobs through ``process_images``, and the
CFGDenoiser batch layouts and UNet-call slicing that A1111 v1.10.1's CFGDenoiser builds (shared/docs/host-notes.md §3)."""

import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent / "a1111"))

from fake_models import make_sd_model
from harness import img2img, load, reset_host, run, script_runner, txt2img
from modules import errors, prompt_parser, script_callbacks, scripts, sd_models, shared
from modules.sd_samplers_kdiffusion import CompVisDenoiser


@dataclass
class DenoiserCall:
    """One CFGDenoiser.forward: its step, pass, ``x_in`` as the callback saw it, and the row ranges of its UNet calls."""

    step: int
    is_hr_pass: bool
    x_in: torch.Tensor
    unet_rows: list[tuple[int, int]] = field(default_factory=list)
    context_tokens: list[int] = field(default_factory=list)
    context_widths: list[int] = field(default_factory=list)


class Recorder:
    def __init__(self):
        self.calls: list[DenoiserCall] = []

    def on_cfg_denoiser(self, params):
        self.calls.append(DenoiserCall(params.denoiser.step, params.denoiser.p.is_hr_pass, params.x))

    def on_unet_call(self, x, cond):
        call = self.calls[-1]
        assert x.untyped_storage().data_ptr() == call.x_in.untyped_storage().data_ptr(), "every UNet input is a view of x_in"
        first = (x.storage_offset() - call.x_in.storage_offset()) // call.x_in.stride(0)
        call.unet_rows.append((first, first + x.shape[0]))
        context = cond["crossattn"] if "crossattn" in cond else torch.cat(cond["c_crossattn"], 1)
        assert context.shape[0] == x.shape[0]
        call.context_tokens.append(context.shape[1])
        call.context_widths.append(context.shape[2])

    def rows(self, is_hr_pass=False):
        return [c.unet_rows for c in self.calls if c.is_hr_pass == is_hr_pass]


@pytest.fixture(autouse=True)
def _host():
    reset_host()
    yield
    reset_host()


@pytest.fixture
def recorder(monkeypatch):
    recorder = Recorder()
    script_callbacks.on_cfg_denoiser(recorder.on_cfg_denoiser)
    forward = CompVisDenoiser.forward

    def recording_forward(self, input, sigma, **kwargs):
        recorder.on_unet_call(input, kwargs["cond"])
        return forward(self, input, sigma, **kwargs)

    monkeypatch.setattr(CompVisDenoiser, "forward", recording_forward)
    return recorder


@pytest.mark.parametrize("sampler", ["Euler", "Heun"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_txt2img_job_with_hires(family, sampler, recorder):
    load(make_sd_model(family))
    runner, args = script_runner()
    result = run(txt2img(runner, args, batch_size=2, steps=4, sampler_name=sampler, enable_hr=True, hr_scale=2.0))

    calls_per_pass = 4 if sampler == "Euler" else 7  # Heun: 2 calls per step, 1 on the last
    first, hires = recorder.rows(False), recorder.rows(True)
    assert len(first) == len(hires) == calls_per_pass
    assert all(rows == [(0, 4)] for rows in first + hires)  # one batched call: 2 cond rows, then 2 uncond rows
    assert [c.step for c in recorder.calls] == [*range(calls_per_pass), *range(calls_per_pass)]
    assert recorder.calls[0].x_in.shape == (4, 4, 8, 8) and recorder.calls[-1].x_in.shape == (4, 4, 16, 16)
    assert [tuple(image.shape) for image in result.images] == [(4, 16, 16)] * 2
    assert "Hires upscale: 2.0" in result.infotexts[0] and "Denoising strength: 0.75" in result.infotexts[0]


def test_img2img_job(recorder):
    load(make_sd_model("sd1"))
    runner, args = script_runner(is_img2img=True)
    result = run(img2img(runner, args, batch_size=2, steps=4, denoising_strength=0.5))
    assert recorder.rows() == [[(0, 4)]] * 3  # t_enc = int(0.5 * 4) = 2: 3 sampler steps
    assert len(result.images) == 2 and "Denoising strength: 0.5" in result.infotexts[1]


def test_edit_model_rows(recorder):
    load(make_sd_model("edit"))
    run(img2img(batch_size=2, steps=4, denoising_strength=0.5, image_cfg_scale=1.5))
    assert recorder.calls[0].x_in.shape[0] == 6  # cond, image-cond (uncond text), uncond blocks
    assert recorder.rows() == [[(0, 6)]] * 3


AND_PROMPTS = ["a cat AND a dog:0.5", "a bird"]  # image 0: cond rows 0, 1; image 1: row 2; uncond rows 3, 4
LONG_PROMPTS = ["a cat AND a dog BREAK in the rain:0.5", "a bird"]  # 154 tokens for every cond row


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize(
    ("options", "prompts", "expected_rows", "tokens"),
    [
        ({}, AND_PROMPTS, [(0, 5)], [77]),
        ({"batch_cond_uncond": False}, AND_PROMPTS, [(0, 2), (2, 4), (4, 5)], [77, 77, 77]),
        ({}, LONG_PROMPTS, [(0, 3), (3, 5)], [154, 77]),  # path 2: cond rows, then x_in[-n:]
        ({"batch_cond_uncond": False}, LONG_PROMPTS, [(0, 2), (2, 3), (3, 5)], [154, 154, 77]),
        ({"pad_cond_uncond": True}, LONG_PROMPTS, [(0, 5)], [154]),
        ({"pad_cond_uncond_v0": True}, LONG_PROMPTS, [(0, 5)], [154]),
    ],
)
def test_cfg_denoiser_rows(family, options, prompts, expected_rows, tokens, recorder):
    load(make_sd_model(family))
    shared.opts.data.update(options)
    p = txt2img(prompt=prompts, negative_prompt="blurry", batch_size=2, steps=2)
    run(p)

    x_in = recorder.calls[0].x_in
    assert x_in.shape[0] == 5
    assert torch.equal(x_in[0], x_in[1]) and torch.equal(x_in[0], x_in[3]) and torch.equal(x_in[2], x_in[4])
    assert recorder.rows() == [expected_rows] * 2
    assert recorder.calls[0].context_tokens == tokens
    assert ("Pad conds" in p.extra_generation_params) == options.get("pad_cond_uncond", False)
    assert ("Pad conds v0" in p.extra_generation_params) == options.get("pad_cond_uncond_v0", False)


@pytest.mark.parametrize(("batch_cond_uncond", "skipped_rows"), [(True, [(0, 3)]), (False, [(0, 2), (2, 3)])])
def test_skip_early_cfg_drops_the_uncond_rows(batch_cond_uncond, skipped_rows, recorder):
    load(make_sd_model("sd1"))
    shared.opts.data.update(skip_early_cond=0.5, batch_cond_uncond=batch_cond_uncond)
    p = txt2img(prompt=AND_PROMPTS, batch_size=2, steps=4)
    run(p)
    full = [(0, 5)] if batch_cond_uncond else [(0, 2), (2, 4), (4, 5)]
    assert recorder.rows() == [skipped_rows] * 3 + [full]  # step / total_steps <= 0.5 for steps 0, 1, 2
    assert p.extra_generation_params["Skip Early CFG"] == 0.5


def test_ngms_skips_odd_steps(recorder):
    load(make_sd_model("sd1"))
    p = txt2img(batch_size=2, steps=4, s_min_uncond=1000.0)
    run(p)
    assert recorder.rows() == [[(0, 4)], [(0, 2)], [(0, 4)], [(0, 2)]]
    assert p.extra_generation_params["NGMS"] == 1000.0


def test_prompt_schedules():
    schedules = prompt_parser.get_learned_conditioning_prompt_schedules
    assert schedules(["a [b:c:2] d"], 10) == [[[2, "a b d"], [10, "a c d"]]]
    assert schedules(["a [b:.5] c", "a [b::3]"], 10) == [[[5, "a  c"], [10, "a b c"]], [[3, "a b"], [10, "a "]]]
    assert schedules(["a [b:1.5] c"], 10, 10) == [[[5, "a  c"], [10, "a b c"]]]


class RecordingScript(scripts.Script):
    """An alwayson script that records its hooks (name, script args) and fails in ``process_batch``."""

    def __init__(self):
        self.hooks = []

    def title(self):
        return "Recording"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def setup(self, p, *args):
        self.hooks.append(("setup", args))

    def before_process(self, p, *args):
        self.hooks.append(("before_process", args))

    def process(self, p, *args):
        self.hooks.append(("process", args))

    def before_process_batch(self, p, *args, **kwargs):
        self.hooks.append(("before_process_batch", args))

    def after_extra_networks_activate(self, p, *args, **kwargs):
        self.hooks.append(("after_extra_networks_activate", args))

    def process_batch(self, p, *args, **kwargs):
        self.hooks.append(("process_batch", args))
        raise ValueError("reported, not raised")

    def process_before_every_sampling(self, p, *args, **kwargs):
        self.hooks.append(("process_before_every_sampling", args))

    def before_hr(self, p, *args):
        self.hooks.append(("before_hr", args))

    def post_sample(self, p, ps, *args):
        self.hooks.append(("post_sample", args))

    def postprocess_batch(self, p, *args, **kwargs):
        self.hooks.append(("postprocess_batch", args))

    def postprocess(self, p, processed, *args):
        self.hooks.append(("postprocess", args))


def test_alwayson_script_hooks_in_host_order():
    load(make_sd_model("sd1"))
    script = RecordingScript()
    runner, args = script_runner((script, [True, 2.5]))
    assert args == [0, True, 2.5] and (script.args_from, script.args_to) == (1, 3)
    run(txt2img(runner, args, steps=2, enable_hr=True))
    assert [name for name, _ in script.hooks] == [
        "setup",
        "before_process",
        "process",
        "before_process_batch",
        "after_extra_networks_activate",
        "process_batch",
        "process_before_every_sampling",
        "after_extra_networks_activate",  # hires pass: extra networks again
        "before_hr",
        "process_before_every_sampling",
        "post_sample",
        "postprocess_batch",
        "postprocess",
    ]
    assert all(hook_args == (True, 2.5) for _, hook_args in script.hooks)
    assert [message for message, _ in errors.reported] == [f"Error running process_batch: {script.filename}"]


def test_refiner_switch_mid_pass(recorder):
    base, refiner = load(make_sd_model("sdxl")), make_sd_model("sdxl_refiner")
    sd_models.register(refiner)
    p = txt2img(steps=4, refiner_checkpoint=refiner.sd_checkpoint_info.title, refiner_switch_at=0.5)
    run(p)
    # completed ratio (999 - timestep) / 1000 at timesteps 999, 666, 333, 0: the switch happens on the third call
    assert [c.context_tokens for c in recorder.calls] == [[77]] * 4
    assert [c.context_widths for c in recorder.calls] == [[2048], [2048], [1280], [1280]]
    assert p.extra_generation_params["Refiner"] == refiner.sd_checkpoint_info.short_title
    assert shared.sd_model is refiner and shared.opts.sd_model_checkpoint == base.sd_checkpoint_info.title
    run(txt2img(steps=1))  # the next job reloads the selected checkpoint
    assert shared.sd_model is base
