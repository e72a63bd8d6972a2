"""The NAG script end to end on the A1111 stand-in (tests/a1111): real ldm UNets, every batching
path of CFGDenoiser, hires fix, the refiner, CFG 1, clean-up, infotext, XYZ and the API."""

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
from fake_models import make_sd_model
from harness import img2img, load, reset_host, run, script_runner, txt2img
from modules import errors, prompt_parser, script_callbacks, scripts, sd_models, shared
from modules.api import api

from lib_nag import params as nag_params
from lib_nag.hosts import HOST
from lib_nag.models import unet
from lib_nag.params import NagParamError
from lib_nag.webui import a1111_rows

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "nag.py"
NAG_ON = [True, 5.0, 2.5, 0.25, 0.0, 1.0, "", "Both passes"]


def load_script_module(name="nag.py"):
    """As modules/script_loading.load_module: the file's basename is the module name."""
    spec = importlib.util.spec_from_file_location(name, SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Spy:
    """Records every cross-attention call NAG guides (module, input shape, context, positive rows,
    their NAG-negative rows, the NAG negative) and every module a pass hooked."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.hooked = []
        real_begin, real_hook, real_inner = unet.A1111UNetPass.begin_attention, unet.A1111UNetPass.hook, unet.A1111UNetPass.hook_inner_model

        def begin(nag_pass, module, args, kwargs):
            real_begin(nag_pass, module, args, kwargs)
            call = nag_pass.nag._call
            if call is not None:
                context = kwargs.get("context", args[1] if len(args) > 1 else None)
                rows, negative_index = call.positive.rows.tolist(), call.positive.negative_index.tolist()
                self.calls.append((module, call.x.shape, context, rows, negative_index, nag_pass.negative))

        def hook(nag_pass, sd_model):
            hooked = real_hook(nag_pass, sd_model)
            unet = a1111_rows.diffusion_model(sd_model)
            self.hooked += [unet, *unet.modules()]
            return hooked

        def hook_inner(nag_pass, inner):
            self.hooked.append(inner)
            real_inner(nag_pass, inner)

        monkeypatch.setattr(unet.A1111UNetPass, "begin_attention", begin)
        monkeypatch.setattr(unet.A1111UNetPass, "hook", hook)
        monkeypatch.setattr(unet.A1111UNetPass, "hook_inner_model", hook_inner)

    def attn2_hooked(self):
        return any(m.to_q._forward_hooks for m in self.hooked if hasattr(m, "to_q"))


@pytest.fixture
def spy(monkeypatch):
    reset_host()
    module = load_script_module()
    spy = Spy(monkeypatch)
    spy.script_class = module.NagScript
    yield spy
    assert_nothing_left(spy)


def assert_nothing_left(spy):
    assert HOST.live is None
    for module in spy.hooked:
        assert not module._forward_hooks and not module._forward_pre_hooks and "forward" not in vars(module)
    ours = {path.name for path in (SCRIPT.parents[1] / "lib_nag").rglob("*.py")}
    for callbacks in script_callbacks.callback_map.values():
        assert not [c for c in callbacks if Path(c.script).name in ours]


def job(spy, args=None, family="sd1", kind=txt2img, **fields):
    """A job with the NAG script (and the model loaded unless one is)."""
    if shared.sd_model is None:
        load(make_sd_model(family))
    runner, script_args = script_runner((spy.script_class(), args or NAG_ON), is_img2img=kind is img2img)
    return kind(runner, script_args, **fields)


def encode(text):
    cond = shared.sd_model.get_learned_conditioning(prompt_parser.SdConditioning([text]))
    return (cond["crossattn"] if isinstance(cond, dict) else cond)[0]


def same_text(row, encoding):
    """A context row carries a text if its tokens start like that text's encoding (padding
    may lengthen or, for pad v0, shorten one of them)."""
    n = min(row.shape[0], encoding.shape[0])
    return torch.equal(row[:n], encoding[:n].to(row.dtype))


def check_rows(spy, positives, negatives, nag_negatives):
    """Every guided row carries a positive prompt and is guided away from its image's NAG
    negative; every unguided row of a guided call carries a negative prompt."""
    positive_codes = [[encode(t) for t in texts] for texts in positives]
    negative_codes = [encode(t) for t in negatives]
    nag_codes = [encode(t) for t in nag_negatives]
    assert spy.calls
    for _module, _shape, context, rows, negative_index, negative in spy.calls:
        for row in range(context.shape[0]):
            image = next((i for i, codes in enumerate(positive_codes) if any(same_text(context[row], c) for c in codes)), None)
            if image is not None:
                assert row in rows
                assert negative_index[rows.index(row)] == image
                assert same_text(negative[image], nag_codes[image])
            else:
                assert any(same_text(context[row], c) for c in negative_codes), "a row that is neither cond nor uncond"
                assert row not in rows


def first_x_out():
    """Record the denoiser's x_out of its first call (cfg_denoised sees it)."""
    seen = []
    script_callbacks.on_cfg_denoised(lambda params: seen.append(params.x.clone()) if not seen else None)
    return seen


PATHS = {
    "batch_cond_uncond": {},
    "batch_cond_uncond off": {"opts": {"batch_cond_uncond": False}},
    "lengths differ, no padding": {"long": True},
    "lengths differ, pad_cond_uncond": {"long": True, "opts": {"pad_cond_uncond": True}},
    "lengths differ, pad_cond_uncond_v0": {"long": True, "opts": {"pad_cond_uncond_v0": True}},
    "lengths differ, batch_cond_uncond off": {"long": True, "opts": {"batch_cond_uncond": False}},
    "NGMS skips uncond": {"fields": {"s_min_uncond": 100.0}},
    "skip_early_cond": {"opts": {"skip_early_cond": 0.5}, "fake_uncond_at_first_step": True},
    "AND with weights": {"and": True},
    "sdxl": {"family": "sdxl"},
    "sd2, Heun": {"family": "sd2", "fields": {"sampler_name": "Heun"}},
}


@pytest.mark.parametrize("path", list(PATHS))
def test_every_batching_path_guides_exactly_the_positive_rows(spy, path):
    config = PATHS[path]
    load(make_sd_model(config.get("family", "sd1")))
    for key, value in config.get("opts", {}).items():
        setattr(shared.opts, key, value)
    long = " ".join(f"w{i}" for i in range(90)) if config.get("long") else ""
    prompts = [f"a red cat {long}", f"a blue dog {long}"]
    positives = [[p] for p in prompts]
    if config.get("and"):
        prompts = [f"{prompts[0]} AND a hat:0.5", f"{prompts[1]} AND a scarf:0.7 AND a bow:0.2"]
        positives = [[positives[0][0], "a hat"], [positives[1][0], "a scarf", "a bow"]]
    negatives = ["ugly blurry", "lowres text"]
    fields = {"prompt": prompts, "negative_prompt": negatives, "batch_size": 2, **config.get("fields", {})}

    reference = first_x_out()
    run(job(spy, [False, *NAG_ON[1:]], **fields))
    assert not spy.calls
    guided = first_x_out()
    processed = run(job(spy, **fields))

    check_rows(spy, positives, negatives, negatives)  # an empty NAG box: each image's main negative
    if not config.get("fake_uncond_at_first_step"):  # skip_early_cond fills uncond with cond outputs
        assert torch.equal(guided[0][-2:], reference[0][-2:])  # uncond rows: bit-identical to the host
    assert not torch.equal(guided[0][:-2], reference[0][:-2])
    assert "NAG scale: 5.0" in processed.infotexts[0]


def test_instruct_pix2pix_guides_only_the_text_cond_rows(spy):
    load(make_sd_model("edit"))
    init = torch.randn(2, 4, 8, 8)
    fields = {"prompt": ["make it red", "make it blue"], "negative_prompt": ["dark", "noisy"], "batch_size": 2}
    processed = run(job(spy, kind=img2img, init_latent=init, image_cfg_scale=1.5, denoising_strength=0.75, **fields))
    check_rows(spy, [["make it red"], ["make it blue"]], ["dark", "noisy"], ["dark", "noisy"])
    assert all(shape[0] in (2, 6) for _m, shape, *_ in spy.calls)  # [cond, uncond, image-only] rows
    assert processed.images


def test_nag_box_is_used_for_every_image_with_lora_tags_stripped(spy):
    args = [True, 5.0, 2.5, 0.25, 0.0, 1.0, "glasses, beard <lora:someone:0.8>", "Both passes"]
    run(job(spy, args, prompt=["a man", "a woman"], negative_prompt=["ugly", "bad"], batch_size=2))
    check_rows(spy, [["a man"], ["a woman"]], ["ugly", "bad"], ["glasses, beard", "glasses, beard"])


def test_empty_nag_prompt_on_sdxl_is_encoded_not_zeroed(spy):
    load(make_sd_model("sdxl"))
    run(job(spy, negative_prompt=""))
    negative = spy.calls[0][-1]
    assert negative.abs().sum() > 0 and same_text(negative[0], encode(""))


def test_prompt_scheduling_in_the_nag_negative(spy):
    args = [True, 5.0, 2.5, 0.25, 0.0, 1.0, "[glasses:hat:2]", "Both passes"]
    run(job(spy, args, steps=4))
    negatives = []
    for *_rest, negative in spy.calls:
        if not negatives or negatives[-1] is not negative:
            negatives.append(negative)
    assert len(negatives) == 2  # rebuilt once, when the schedule moves: K⁻/V⁻ are reused otherwise
    assert same_text(negatives[0][0], encode("glasses")) and same_text(negatives[1][0], encode("hat"))


def test_window_counts_second_order_steps_once_and_unhooks_after_the_end(spy, capsys):
    args = [True, 5.0, 2.5, 0.25, 0.0, 0.5, "", "Both passes"]
    hooked_at_last_call = []
    script_callbacks.on_cfg_denoised(
        lambda params: hooked_at_last_call.append(spy.attn2_hooked())
    )
    run(job(spy, args, steps=4, sampler_name="Heun"))
    assert hooked_at_last_call[0] and not hooked_at_last_call[-1]  # the host's forwards run after the end step
    layers = len(unet.attn2_modules(shared.sd_model.model.diffusion_model))
    assert len(spy.calls) == 2 * 2 * layers  # steps 0 and 1, two denoiser calls each
    assert "first pass 2/4 steps guided (28 cross-attention calls), 7 cross-attention layers hooked" in capsys.readouterr().out


HIRES_MODES = [("Both passes", True, True), ("First pass only", True, False), ("Hires pass only", False, True)]


@pytest.mark.parametrize("mode,first,hires", HIRES_MODES)
def test_hires_modes_and_the_hires_negative(spy, monkeypatch, mode, first, hires):
    encoded = []
    real = prompt_parser.get_learned_conditioning
    monkeypatch.setattr(
        prompt_parser, "get_learned_conditioning", lambda m, prompts, *a, **k: encoded.append(prompts) or real(m, prompts, *a, **k)
    )
    args = [True, 5.0, 2.5, 0.25, 0.0, 1.0, "glasses", mode]
    run(job(spy, args, enable_hr=True, hr_scale=2, hr_second_pass_steps=3, denoising_strength=0.6, hr_upscaler="Latent (nearest)"))
    tokens = {shape[1] for _m, shape, *_ in spy.calls}  # 8×8 latents: 64 and 16 tokens; 16×16: 256 and 64
    assert (16 in tokens, 256 in tokens) == (first, hires)
    nag_encodes = [p for p in encoded if list(p) == ["glasses"]]
    if hires:
        assert (nag_encodes[-1].width, nag_encodes[-1].height) == (128, 128)


def test_refiner_switch_moves_nag_to_the_refiner(spy):
    base, refiner = make_sd_model("sdxl"), make_sd_model("sdxl_refiner")
    sd_models.register(refiner)
    load(base)
    run(job(spy, steps=4, refiner_checkpoint=refiner.sd_checkpoint_info.title, refiner_switch_at=0.5))
    widths = [negative.shape[-1] for *_rest, negative in spy.calls]
    assert widths[0] == 2048 and widths[-1] == 1280
    refiner_modules = set(map(id, (m for _n, m in unet.attn2_modules(refiner.model.diffusion_model))))
    assert any(id(module) in refiner_modules for module, *_ in spy.calls)


@pytest.fixture
def unet_rows(monkeypatch):
    """The number of rows of every UNet call, on a fresh SD1 model."""
    rows = []
    model = load(make_sd_model("sd1"))
    real_apply = type(model).apply_model
    monkeypatch.setattr(type(model), "apply_model", lambda self, x, t, cond: rows.append(x.shape[0]) or real_apply(self, x, t, cond))
    return rows


def test_cfg_1_skips_the_uncond_pass_with_the_same_result(spy, monkeypatch, unet_rows):
    rows = unet_rows
    fields = {"cfg_scale": 1.0, "batch_size": 2, "prompt": ["a cat", "a dog:0.25 AND a hat:0.75"], "steps": 3}
    skipped = run(job(spy, **fields)).images
    assert rows == [3, 3, 3]  # cond rows only: 1 for the cat, 2 for the dog's AND (weights sum to 1)
    rows.clear()
    monkeypatch.setattr(a1111_rows, "uncond_is_unused", lambda denoiser, weights: False)
    with_uncond = run(job(spy, **fields)).images
    assert rows == [5, 5, 5]
    for a, b in zip(skipped, with_uncond, strict=True):
        # Equal up to the rounding of u + (c − u)·1 in the host's combine, carried over 3 steps.
        assert (a - b).abs().max() <= 1e-6 * b.abs().max()


def test_cfg_1_keeps_the_uncond_pass_when_weights_do_not_sum_to_1(spy, unet_rows):
    run(job(spy, cfg_scale=1.0, prompt="a dog AND a hat:0.25", steps=2))
    assert unet_rows == [3, 3]


def test_cfg_1_keeps_the_uncond_pass_when_another_extension_reads_it(spy, monkeypatch, unet_rows):
    from modules import sd_samplers_cfg_denoiser

    script_callbacks.on_cfg_denoised(lambda params: None)
    run(job(spy, cfg_scale=1.0, steps=1))
    script_callbacks.clear_callbacks()
    monkeypatch.setattr(sd_samplers_cfg_denoiser.CFGDenoiser, "combine_denoised", lambda self, *args: args[0][:1])  # a hijack
    run(job(spy, cfg_scale=1.0, steps=1))
    assert unet_rows == [2, 2]


@pytest.mark.parametrize("ending", ["finished", "interrupted", "skipped", "raised"])
def test_nothing_is_left_after_any_job(spy, monkeypatch, ending):
    model = make_sd_model("sd1")
    load(model)
    steps_seen = []

    def at_step(params):
        steps_seen.append(params.denoiser.step)
        if params.denoiser.step == 1 and ending == "interrupted":
            shared.state.interrupted = True
        if params.denoiser.step == 1 and ending == "skipped":
            shared.state.skipped = True

    script_callbacks.on_cfg_denoiser(at_step)
    p = job(spy, steps=4)
    if ending == "raised":
        real_apply = type(model).apply_model

        def broken(self, x, t, cond):
            if len(steps_seen) >= 3:
                raise RuntimeError("CUDA out of memory")
            return real_apply(self, x, t, cond)

        monkeypatch.setattr(type(model), "apply_model", broken)
        with pytest.raises(RuntimeError, match="out of memory"):
            run(p)
    else:
        run(p)
    assert "sample" not in p.__dict__
    assert spy.calls  # NAG ran before the job ended


def test_a_change_of_attention_optimization_between_jobs_is_honoured(spy, monkeypatch):
    from ldm.modules.attention import CrossAttention

    run(job(spy, steps=2))
    calls = []
    stock = CrossAttention.forward

    def optimized(self, x, context=None, mask=None, **kwargs):
        calls.append(self)
        return stock(self, x, context=context, mask=mask)

    monkeypatch.setattr(CrossAttention, "forward", optimized)  # as SdOptimization.apply() does
    run(job(spy, steps=2))
    attn2 = {id(m) for _n, m in unet.attn2_modules(shared.sd_model.model.diffusion_model)}
    assert any(id(m) in attn2 for m in calls)


def test_an_unknown_architecture_is_skipped_with_a_console_line_and_no_infotext(spy, capsys):
    load(make_sd_model("dit"))
    processed = run(job(spy, steps=2))
    assert "NAG" not in processed.infotexts[0]
    assert "[NAG] skipped: NAG does not know the attention layers of FakeSdModel (TinyJointNet)" in capsys.readouterr().out
    assert not spy.calls


@pytest.mark.parametrize("cfg_scale", [7.0, 1.0])
def test_sd3_is_guided_through_its_mmdit(spy, capsys, cfg_scale):
    model = load(make_sd_model("sd3"))
    mmdit = model.model.diffusion_model
    fields = {"steps": 2, "batch_size": 2, "prompt": ["a cat", "a dog"], "negative_prompt": ["ugly", "bad"], "cfg_scale": cfg_scale}
    reference = first_x_out()
    off = run(job(spy, [False, *NAG_ON[1:]], **fields))
    guided = first_x_out()
    on = run(job(spy, **fields))
    if cfg_scale != 1.0:  # at CFG 1 the uncond rows are not computed (zeros) while NAG is on
        assert torch.equal(guided[0][-2:], reference[0][-2:])  # uncond rows: the host's, bit for bit
    assert not all(torch.equal(a, b) for a, b in zip(on.images, off.images, strict=True))
    assert "NAG scale: 5.0" in on.infotexts[0] and "NAG" not in off.infotexts[0]
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[NAG] active")]
    assert lines == ["[NAG] active on SD3: first pass 2/2 steps guided (2 model calls), 2 joint blocks"]
    assert "forward" not in vars(mmdit) and not mmdit._forward_hooks and not mmdit._forward_pre_hooks


def test_console_line_per_job(spy, capsys):
    run(job(spy, steps=3, n_iter=2))
    out = [line for line in capsys.readouterr().out.splitlines() if line.startswith("[NAG]")]
    assert out == ["[NAG] active on SD1: first pass 3/3 steps guided (42 cross-attention calls), 7 cross-attention layers hooked"]


def test_pre_1_10_hooks_guide_both_passes(spy, monkeypatch):
    """A1111 1.6–1.9 have no process_before_every_sampling: process_batch and before_hr run NAG."""
    monkeypatch.delattr(scripts.Script, "process_before_every_sampling")
    monkeypatch.setattr(scripts.ScriptRunner, "process_before_every_sampling", lambda self, p, **kwargs: None)
    spy.script_class = load_script_module("nag_old.py").NagScript
    assert not hasattr(spy.script_class, "process_before_every_sampling")
    run(job(spy, enable_hr=True, hr_scale=2, hr_second_pass_steps=2, denoising_strength=0.6, steps=2))
    assert {shape[1] for _m, shape, *_ in spy.calls} >= {64, 256}


# --- arguments: API, XYZ, infotext ---------------------------------------------------------------


def api_job(spy, alwayson_args, **fields):
    """Script args as Api.init_script_args fills them from ``alwayson_scripts``."""
    load(make_sd_model("sd1"))
    script = spy.script_class()
    runner, defaults = script_runner((script, nag_params.to_args(nag_params.DEFAULTS)))
    script.title = lambda: "NAG"
    request = type("Request", (), {"alwayson_scripts": {"nag": {"args": alwayson_args}}, "script_name": None})()
    script_args = api.init_script_args(request, defaults, [], None, runner)
    p = txt2img(runner, script_args, steps=2, **fields)
    p.is_api = True
    return p


def test_api_dict_and_list_arguments(spy):
    dict_job = run(api_job(spy, [{"enabled": True, "scale": 7, "negative_prompt": "glasses"}]))
    assert "NAG scale: 7.0" in dict_job.infotexts[0] and "NAG negative prompt: glasses" in dict_job.infotexts[0]
    list_job = run(api_job(spy, [True, 3]))
    assert "NAG scale: 3.0" in list_job.infotexts[0] and "NAG tau: 2.5" in list_job.infotexts[0]


@pytest.mark.parametrize(
    "args,field",
    [
        ([{"enabled": True, "scale": "high"}], r"\(scale\)"),
        ([{"enabled": True, "sclae": 5}], "sclae"),
        ([True, float("nan")], r"\(scale\)"),
        ([True, 5, 0.5], r"\(tau\)"),
        ([True, 5, 2.5, 0.25, 0, 1, 3], r"\(negative_prompt\)"),
    ],
)
def test_bad_api_arguments_fail_the_request_naming_the_field_and_the_next_works(spy, args, field):
    with pytest.raises(NagParamError, match=field) as raised:
        run(api_job(spy, args))
    status, body = api.handle_exception(raised.value)
    assert status == 500 and body["error"] == "NagParamError"
    assert "NAG scale: 5.0" in run(api_job(spy, [True])).infotexts[0]


def test_xyz_override_does_not_touch_the_shared_arguments(spy):
    from lib_nag.script import xyz

    p = job(spy, steps=2)
    shared_args = list(p.script_args)
    cell = copy.copy(p)  # xyz_grid runs each cell on a shallow copy
    xyz.apply(cell, 9.0, [9.0], name="scale")
    xyz.apply(cell, "False", ["False"], name="enabled")
    xyz.apply(cell, "True", ["True"], name="enabled")
    processed = run(cell)
    assert "NAG scale: 9.0" in processed.infotexts[0]
    assert p.script_args == shared_args and not hasattr(p, "nag_xyz")
    with pytest.raises(NagParamError, match=r"\(tau\)"):
        xyz.confirm(cell, [2.0, 0.5], name="tau")


def built_ui(spy):
    import gradio as gr

    script = spy.script_class()
    script.is_img2img = False
    with gr.Blocks():
        controls = script.ui(False)
    return script, controls


def test_infotext_pastes_back_and_no_nag_keys_turn_it_off(spy):
    from modules import infotext_utils

    script, _controls = built_ui(spy)
    params = nag_params.NagParams(True, 7.5, 3.0, 0.125, 0.1, 0.6, 'glasses, "beard": x\nhat', "Hires pass only", 0.75)
    for made in (params, nag_params.NagParams(enabled=True)):
        line = ", ".join(f"{k}: {infotext_utils.quote(v)}" for k, v in nag_params.to_infotext(made).items())
        pasted = infotext_utils.paste_infotext(f"a cat\nNegative prompt: ugly\nSteps: 20, Sampler: Euler, {line}", script.infotext_fields)
        assert pasted == nag_params.to_args(made)
    no_nag = infotext_utils.paste_infotext("a cat\nSteps: 20, Sampler: Euler, CFG scale: 7", script.infotext_fields)
    assert no_nag == [False] + [None] * (len(nag_params.ARG_ORDER) - 1)  # off; the rest left as they are
    assert script.paste_field_names == [name for _c, name in script.infotext_fields[1:]]  # "Send to" carries them


# --- UI and XYZ registration ----------------------------------------------------------------------


def test_ui_builds_the_accordion_in_argument_order(spy):
    from lib_nag.script import ui

    _script, controls = built_ui(spy)
    assert [c.label for c in controls] == ["NAG", *(nag_params.label(n) for n in nag_params.ARG_ORDER[1:])]
    assert [c.value for c in controls] == nag_params.to_args(nag_params.DEFAULTS)
    for name, control in zip(nag_params.ARG_ORDER, controls, strict=True):
        if name in nag_params.NUMBER_RANGES:  # what /sdapi/v1/script-info reports
            assert (control.minimum, control.maximum) == nag_params.NUMBER_RANGES[name][1:]
    assert controls[nag_params.ARG_ORDER.index("hires_mode")].choices and controls[0].elem_id == "script_txt2img_nag_enabled-checkbox"
    assert ui.preset_values("SD1.x") == [5.0, 2.5, 0.38, 0.0, 1.0, 4.0]


def test_xyz_axes_are_registered_once_per_ui_build(spy):
    from lib_nag.script import xyz

    spec = importlib.util.spec_from_file_location("xyz_grid.py", Path(__file__).parent / "a1111" / "xyz_grid.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    scripts.scripts_data.append(scripts.ScriptClassData(module.Script, spec.origin, str(spec.origin), module))
    script_callbacks.before_ui_callback()
    script_callbacks.before_ui_callback()
    labels = [option.label for option in module.axis_options]
    assert labels == ["Nothing", *(f"[NAG] {title}" for _name, title in xyz.AXES)]
    assert module.axis_options[1].choices() == ["False", "True"]


def test_script_unload_mid_sampling_ends_the_job(spy):
    steps = []

    def unload_at_step_1(params):
        steps.append(params.denoiser.step)
        if params.denoiser.step == 1:
            script_callbacks.script_unloaded_callback()

    script_callbacks.on_cfg_denoiser(unload_at_step_1)
    p = job(spy, steps=3)
    run(p)
    layers = len(unet.attn2_modules(shared.sd_model.model.diffusion_model))
    assert steps == [0, 1, 2] and len(spy.calls) == layers  # guided at step 0 only
    assert "sample" not in p.__dict__ and "nag_job" not in p.__dict__


def test_hires_only_without_hires_writes_no_infotext(spy, capsys):
    processed = run(job(spy, [True, 5.0, 2.5, 0.25, 0.0, 1.0, "", "Hires pass only"], steps=2))
    assert "NAG" not in processed.infotexts[0] and not spy.calls
    assert "[NAG] skipped: hires pass only mode" in capsys.readouterr().out


def test_a1111_1_6_callback_params_without_denoiser(spy, monkeypatch):
    """CFGDenoiserParams gained ``denoiser`` in 1.8; before, the sampler holds the denoiser."""
    real = script_callbacks.CFGDenoiserParams.__init__

    def without_denoiser(self, *args, denoiser=None, **kwargs):
        real(self, *args[:7], **kwargs)
        del self.denoiser

    monkeypatch.setattr(script_callbacks.CFGDenoiserParams, "__init__", without_denoiser)
    run(job(spy, steps=2))
    assert spy.calls and not errors.reported


def test_a1111_1_9_0_stale_sorted_callbacks_do_not_revive_a_closed_pass(spy, monkeypatch):
    """1.9.0's remove_callbacks_for_function left its sorted copy in ordered_callbacks_map."""

    def remove_without_purge(callback_func):
        for callbacks in script_callbacks.callback_map.values():
            callbacks[:] = [c for c in callbacks if c.callback != callback_func]

    monkeypatch.setattr(script_callbacks, "remove_callbacks_for_function", remove_without_purge)
    run(job(spy, steps=2))
    first = len(spy.calls)
    run(job(spy, steps=2))
    assert len(spy.calls) == 2 * first


def test_hires_checkpoint_change_moves_nag_to_the_hires_model(spy):
    base, hires_model = make_sd_model("sd1"), make_sd_model("sd2")
    sd_models.register(hires_model)
    load(base)
    fields = {"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2, "denoising_strength": 0.6, "steps": 2}
    run(job(spy, hr_checkpoint_name=hires_model.sd_checkpoint_info.title, **fields))
    hires_modules = {id(m) for _n, m in unet.attn2_modules(hires_model.model.diffusion_model)}
    widths = {(id(module) in hires_modules, negative.shape[-1]) for module, *_rest, negative in spy.calls}
    assert widths == {(False, 768), (True, 1024)}  # each pass with its model's UNet and text encoder


def test_img2img_inpaint_guides_the_positive_rows(spy):
    mask = torch.zeros(8, 8)  # latent resolution, 1 where the image is regenerated
    mask[2:6, 2:6] = 1
    fields = {"prompt": ["a red hat", "a blue hat"], "negative_prompt": ["ugly", "bad"], "batch_size": 2}
    processed = run(job(spy, kind=img2img, init_latent=torch.randn(2, 4, 8, 8), mask=mask, denoising_strength=0.75, **fields))
    check_rows(spy, [["a red hat"], ["a blue hat"]], ["ugly", "bad"], ["ugly", "bad"])
    assert "NAG scale: 5.0" in processed.infotexts[0]


def test_a_job_failing_before_sampling_leaves_nothing(spy, monkeypatch):
    from modules import processing

    def broken_init(self, *args):
        raise RuntimeError("VAE not loaded")

    working_init = processing.StableDiffusionProcessingTxt2Img.init
    monkeypatch.setattr(processing.StableDiffusionProcessingTxt2Img, "init", broken_init)
    with pytest.raises(RuntimeError, match="VAE not loaded"):
        run(job(spy))
    monkeypatch.setattr(processing.StableDiffusionProcessingTxt2Img, "init", working_init)
    assert "NAG scale: 5.0" in run(job(spy, steps=1)).infotexts[0]


def test_pre_1_10_hooks_left_by_a_job_failing_before_sampling_go_at_the_next_job(spy, monkeypatch):
    """Before 1.10 the pass starts in process_batch, outside p.sample; no host hook runs after a
    failure in between, so the next job's start undoes it."""
    from modules import processing

    monkeypatch.delattr(scripts.Script, "process_before_every_sampling")
    monkeypatch.setattr(scripts.ScriptRunner, "process_before_every_sampling", lambda self, p, **kwargs: None)
    spy.script_class = load_script_module("nag_old.py").NagScript
    working = processing.StableDiffusionProcessingTxt2Img.setup_conds

    def broken(self):
        raise RuntimeError("bad prompt")

    monkeypatch.setattr(processing.StableDiffusionProcessingTxt2Img, "setup_conds", broken)
    with pytest.raises(RuntimeError, match="bad prompt"):
        run(job(spy))
    assert HOST.live is not None
    monkeypatch.setattr(processing.StableDiffusionProcessingTxt2Img, "setup_conds", working)
    run(job(spy, steps=1))


def test_sd3_hires_img2img_interrupted_and_failing_jobs_leave_the_mmdit_as_it_was(spy, monkeypatch, capsys):
    model = load(make_sd_model("sd3"))
    mmdit = model.model.diffusion_model
    hires = {"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 2, "denoising_strength": 0.6, "hr_upscaler": "Latent (nearest)"}
    processed = run(job(spy, steps=2, **hires))
    assert "first pass 2/2 steps guided (2 model calls), hires pass 2/2 steps guided (2 model calls)" in capsys.readouterr().out
    assert "NAG scale: 5.0" in processed.infotexts[0]
    init = torch.randn(1, 16, 8, 8)
    assert "NAG scale: 5.0" in run(job(spy, kind=img2img, init_latent=init, denoising_strength=0.75, steps=2)).infotexts[0]
    calls = []

    def failing(self, x, *args, **kwargs):
        calls.append(1)
        raise RuntimeError("out of memory")

    interrupt_at_step_1 = lambda params: setattr(shared.state, "interrupted", params.denoiser.step == 1)  # noqa: E731
    script_callbacks.on_cfg_denoiser(interrupt_at_step_1)
    run(job(spy, steps=3))
    assert "forward" not in vars(mmdit) and not mmdit._forward_pre_hooks
    script_callbacks.remove_callbacks_for_function(interrupt_at_step_1)
    shared.state.interrupted = False
    monkeypatch.setattr(type(mmdit), "forward", failing)  # the host's forward fails inside NAG's pass
    with pytest.raises(RuntimeError, match="out of memory"):
        run(job(spy, [True, 1.0, 2.5, 0.25, 0.5, 1.0, "", "Both passes"], steps=2))  # outside the window at step 0
    assert calls and "forward" not in vars(mmdit) and not mmdit._forward_pre_hooks and not mmdit._forward_hooks


def test_a_job_without_nag_leaves_the_hosts_infotext_dict_alone(spy):
    """Another extension may hold the dict and write to it later."""
    p = job(spy, [False, *NAG_ON[1:]], steps=1)
    p.extra_generation_params["NAG-like key of another extension"] = 1
    held = p.extra_generation_params
    run(p)
    assert p.extra_generation_params is held and "NAG-like key of another extension" in held


# --- the σ end -----------------------------------------------------------------------------------


def karras(steps):
    """k-diffusion's Karras schedule (ρ 7) between the model's σ_min and σ_max, then 0."""
    sigmas = ((1 - shared.sd_model.alphas_cumprod) / shared.sd_model.alphas_cumprod) ** 0.5
    ramp = torch.linspace(0, 1, steps)
    high, low = sigmas.max() ** (1 / 7), sigmas.min() ** (1 / 7)
    return torch.cat([(high + ramp * (low - high)) ** 7, torch.zeros(1)])


def step_sigmas(denoiser_calls):
    """The σ of each sampler step from the callbacks' parameters (a DDIM "sigma" is a timestep)."""
    alphas = shared.sd_model.alphas_cumprod.double()
    sigmas = []
    for params in denoiser_calls:
        value = params.sigma[0]
        if type(params.denoiser).__name__ == "CFGDenoiserTimesteps":
            value = ((1 - alphas[int(value)]) / alphas[int(value)]).sqrt()
        sigmas.append(float(value))
    return sigmas


SIGMA_SAMPLERS = {  # sampler, schedule (as a script's p.sampler_noise_scheduler_override sets it)
    "Euler, uniform timesteps": ("Euler", None),
    "Euler, Karras": ("Euler", karras),
    "Heun (2 calls a step)": ("Heun", None),
    "DDIM (timesteps)": ("DDIM", None),
}


@pytest.mark.parametrize("sampler,schedule", SIGMA_SAMPLERS.values(), ids=SIGMA_SAMPLERS.keys())
def test_sigma_end_ends_nag_at_the_first_step_whose_sigma_is_below_it(spy, capsys, sampler, schedule):
    calls = []
    script_callbacks.on_cfg_denoiser(lambda params: calls.append(params))
    p = job(spy, [*NAG_ON, 4.0], steps=8, sampler_name=sampler)
    p.sampler_noise_scheduler_override = schedule
    run(p)
    per_step = 2 if sampler == "Heun" else 1
    sigmas = step_sigmas(calls[::per_step])
    guided = next(i for i, sigma in enumerate(sigmas) if sigma < 4.0)
    assert 0 < guided < len(sigmas)  # the σ end falls inside the schedule
    layers = len(unet.attn2_modules(shared.sd_model.model.diffusion_model))
    assert len(spy.calls) == guided * per_step * layers  # every call of the guided steps, none after
    out = capsys.readouterr().out
    assert f"first pass {guided}/8 steps guided ({guided * per_step * layers} cross-attention calls; σ {sigmas[guided]:.4g} below " in out
    assert f"NAG sigma end 4 from step {guided + 1})" in out


def test_a_hires_pass_starting_below_the_sigma_end_is_not_guided_and_says_so(spy, capsys):
    hires = {"enable_hr": True, "hr_scale": 2, "hr_second_pass_steps": 3, "denoising_strength": 0.3, "hr_upscaler": "Latent (nearest)"}
    processed = run(job(spy, [*NAG_ON, 4.0], steps=4, **hires))
    tokens = {shape[1] for _m, shape, *_ in spy.calls}
    assert 256 not in tokens and 16 in tokens  # the first pass is guided, the hires pass (16×16 latents) is not
    out = capsys.readouterr().out
    assert "hires pass 0/" in out and "below NAG sigma end 4 from step 1" in out
    assert "NAG sigma end: 4.0" in processed.infotexts[0]
