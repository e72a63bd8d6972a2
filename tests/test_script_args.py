"""What reaches the NAG script, as each host builds it (issue #8): A1111 1.10.1 and reForge run
Gradio 3.41, Forge and Neo Gradio 4.40 (tests/forge/gradio4.py), where an empty Textbox's value is
``None``. The API fills a request's left-out arguments from the UI's component values
(``Api.init_default_script_args``, tests/a1111/modules/api); the UI sends what the page shows.
A request or UI run without NAG, or with NAG off, must never fail and must give the image of a host
without the extension, bit for bit."""

import gradio as gr
import pytest
import torch
from fake_models import make_sd_model
from gradio4 import use_gradio4_defaults
from harness import load, reset_host, run, txt2img, ui_runner
from modules import infotext_utils, scripts, shared
from modules.api import api
from test_a1111 import load_script_module

from lib_nag import params as nag_params
from lib_nag.hosts import HOST
from lib_nag.script import ui

HOSTS = ["gradio 3.41 (A1111, reForge)", "gradio 4.40 (Forge, Neo)"]


@pytest.fixture(params=HOSTS)
def host(request, monkeypatch):
    reset_host()
    if "4.40" in request.param:
        use_gradio4_defaults(monkeypatch)
    load(make_sd_model("sd1"))
    yield request.param
    assert HOST.live is None
    attn2 = [m for n, m in shared.sd_model.model.diffusion_model.named_modules() if n.endswith(".attn2")]
    assert all(not m._forward_hooks and not m.to_q._forward_hooks and "forward" not in vars(m) for m in attn2)


class Selectable(scripts.Script):
    """A selectable script (like X/Y/Z plot) with three controls, loaded before NAG. The API writes a
    request's ``script_args`` over its slot by slice assignment: a shorter or longer list shifts
    every later script's arguments, NAG's included."""

    def title(self):
        return "Selectable"

    def show(self, is_img2img):
        return True

    def ui(self, is_img2img):
        return [gr.Textbox(value=f"control {i}") for i in range(3)]


def nag_script():
    return load_script_module().NagScript()


def api_job(alwayson_scripts, *, selectable_args=None, with_nag=True, **fields):
    """A txt2img API request: defaults from the page's components, then the selectable script's
    ``script_args`` (when given) and ``alwayson_scripts``."""
    selectable = Selectable() if selectable_args is not None else None
    runner = ui_runner(*(s for s in (selectable, nag_script() if with_nag else None) if s is not None))
    defaults = api.Api().init_default_script_args(runner)
    request = type("Request", (), {"alwayson_scripts": alwayson_scripts, "script_args": selectable_args})()
    script_args = api.init_script_args(request, defaults, selectable, 0, runner)
    p = txt2img(runner, script_args, steps=2, batch_size=2, prompt=["a cat", "a dog"], negative_prompt=["ugly", "bad"], **fields)
    p.is_api = True
    return p


def host_without_nag(**fields):
    return run(api_job(None, with_nag=False, **fields))


def same_image(processed, reference):
    return all(torch.equal(a, b) for a, b in zip(processed.images, reference.images, strict=True))


LEFT_OUT = {
    "no alwayson_scripts": None,
    "empty alwayson_scripts": {},
    "NAG without args": {"NAG": {}},
    "empty args": {"NAG": {"args": []}},
    "disabled, short list": {"NAG": {"args": [False]}},
    "disabled, None elsewhere": {"NAG": {"args": [False, None, None, None, None, None, None, None]}},
    "None everywhere": {"NAG": {"args": [None] * 8}},
    "disabled dict with None": {"NAG": {"args": [{"enabled": False, "alpha": None}]}},
    "disabled dict with garbage": {"NAG": {"args": [{"enabled": False, "tau": "x", "nope": 1}]}},
}


@pytest.mark.parametrize("case", list(LEFT_OUT))
def test_a_request_without_nag_never_fails_and_gives_the_host_image(host, case, capsys):
    reference = host_without_nag()
    processed = run(api_job(LEFT_OUT[case]))
    assert same_image(processed, reference)
    assert processed.infotexts == reference.infotexts
    assert "[NAG]" not in capsys.readouterr().out


@pytest.mark.parametrize("selectable_args", [["a"], ["a", "b", "c", "d", "e"]])
def test_arguments_shifted_by_another_scripts_request_read_as_nag_off(host, selectable_args, capsys):
    reference = run(api_job(None, selectable_args=selectable_args, with_nag=False))
    processed = run(api_job({}, selectable_args=selectable_args))
    assert same_image(processed, reference) and processed.infotexts == reference.infotexts
    assert "[NAG] off: NAG enabled (enabled) is" in capsys.readouterr().out


@pytest.mark.parametrize("position", range(1, 9))
def test_an_enabled_nag_with_a_none_value_takes_that_fields_default(host, position):
    args = [True, 7.0, 3.0, 0.5, 0.0, 0.5, "glasses", "First pass only", 0.75]
    args[position] = None
    processed = run(api_job({"NAG": {"args": args}}))
    name = nag_params.ARG_ORDER[position]
    expected = nag_params.NagParams(**{**dict(zip(nag_params.ARG_ORDER, args, strict=True)), name: getattr(nag_params.DEFAULTS, name)})
    entries = infotext_utils.parse_generation_parameters(processed.infotexts[0])
    assert nag_params.from_infotext(entries) == expected


def test_short_lists_and_dicts_keep_the_defaults(host):
    for args in ([True], [{"enabled": True}], [True, 5, None, None, 0, 1]):
        processed = run(api_job({"NAG": {"args": args}}))
        entries = infotext_utils.parse_generation_parameters(processed.infotexts[0])
        assert nag_params.from_infotext(entries) == nag_params.NagParams(enabled=True)


def test_wrong_values_on_an_enabled_nag_still_fail_naming_the_field(host):
    with pytest.raises(nag_params.NagParamError, match=r"NAG alpha \(alpha\)"):
        run(api_job({"NAG": {"args": [{"enabled": True, "alpha": "high"}]}}))
    assert same_image(run(api_job({})), host_without_nag())


def page_values(runner):
    """What the page sends for each control as first shown; Gradio 4's frontend shows and sends an
    empty (``None``) textbox as ``""``."""
    return [("" if c.value is None and isinstance(c, gr.Textbox) else c.value) for c in runner.inputs[1:]]


def test_ui_runs_with_the_page_values(host):
    runner = ui_runner(nag_script())
    values = page_values(runner)
    assert values == nag_params.to_args(nag_params.DEFAULTS)
    reference = host_without_nag()
    off = run(txt2img(runner, [0, *values], steps=2, batch_size=2, prompt=["a cat", "a dog"], negative_prompt=["ugly", "bad"]))
    assert same_image(off, reference) and off.infotexts == reference.infotexts
    sliders_as_ints = [True, 5, 2.5, 0.25, 0, 1, "", "Both passes"]  # what a Gradio 4 slider at 5 sends
    on = run(txt2img(runner, [0, *sliders_as_ints], steps=2))
    assert "NAG scale: 5.0" in on.infotexts[0]


def built_ui():
    script = nag_script()
    runner = ui_runner(script)
    return script, runner


def test_api_defaults_are_the_documented_arguments(host):
    script, runner = built_ui()
    defaults = api.Api().init_default_script_args(runner)
    assert defaults[script.args_from : script.args_to] == nag_params.to_args(nag_params.DEFAULTS)


def test_pasting_restores_every_field_in_both_gradio_versions(host):
    script, _runner = built_ui()
    made = nag_params.NagParams(True, 7.5, 3.0, 0.125, 0.1, 0.6, "glasses, beard", "Hires pass only")
    line = ", ".join(f"{k}: {infotext_utils.quote(v)}" for k, v in nag_params.to_infotext(made).items())
    pasted = infotext_utils.paste_infotext(f"a cat\nSteps: 20, {line}", script.infotext_fields)
    assert pasted == nag_params.to_args(made)


class Page:
    """A Gradio page, reduced to what its frontend does with ``change`` events: a handler's outputs
    are all set first, then each component whose value changed dispatches ``change``; a no-op update
    sets nothing, and an unchanged value dispatches nothing."""

    def __init__(self, blocks):
        self.blocks, self.events = blocks, 0
        self.values = {c._id: c.value for c in blocks.blocks.values() if hasattr(c, "value")}

    def set(self, component, value):
        self.apply({component._id: value})

    def apply(self, updates):
        changed = [i for i, value in updates.items() if value != self.values[i]]
        self.values.update({i: updates[i] for i in changed})
        for component in changed:
            self.events += 1
            assert self.events < 100, "change events loop"
            for dependency, function in zip(self.blocks.dependencies, self.blocks.fns, strict=True):
                if dependency["trigger"] == "change" and component in dependency["targets"]:
                    result = function.fn(*(self.values[i] for i in dependency["inputs"]))
                    results = result if len(dependency["outputs"]) > 1 else [result]
                    outputs = zip(dependency["outputs"], results, strict=True)
                    self.apply({i: v for i, v in outputs if not (isinstance(v, dict) and "value" not in v)})

    def value(self, component):
        return self.values[component._id]


def page_with_nag():
    with gr.Blocks() as blocks:
        script = nag_script()
        script.is_img2img = False
        controls = dict(zip(nag_params.ARG_ORDER, script.ui(False), strict=True))
    preset = next(c for c in blocks.blocks.values() if getattr(c, "label", None) == "NAG preset")
    return Page(blocks), controls, preset


def test_preset_dropdown_follows_the_numbers(host):
    page, controls, preset = page_with_nag()
    page.set(preset, "SD1.x")
    assert [page.value(controls[n]) for n in ui.PRESET_FIELDS] == [5.0, 2.5, 0.38, 0.0, 1.0, 4.0]
    page.set(controls["alpha"], 0.125)  # a paste, "Send to" or a slider moved
    assert page.value(preset) == ui.CUSTOM
    page.set(preset, "Paper (SDXL)")  # shares its numbers with the few-step preset: stays picked
    assert page.value(preset) == "Paper (SDXL)"
    page.set(preset, ui.CUSTOM)  # changes nothing
    assert page.value(controls["scale"]) == 3.0
    pasted = dict(zip(ui.PRESET_FIELDS, ui.preset_values("SDXL fine-tune / v-pred"), strict=True))
    page.apply({controls[name]._id: value for name, value in pasted.items()})  # numbers matching a preset name it
    assert page.value(preset) == "SDXL fine-tune / v-pred"


def test_every_slider_step_shows_every_preset_value_exactly():
    for preset in nag_params.PRESETS:
        for name, value in zip(ui.PRESET_FIELDS, ui.preset_values(preset.name), strict=True):
            low = nag_params.NUMBER_RANGES[name][1]
            steps = (value - low) / ui.SLIDER_STEPS[name]
            assert abs(steps - round(steps)) < 1e-9, (preset.name, name, value)
