"""The NAG accordion, the same in every host (Gradio 3 in A1111, Gradio 4 in Forge)."""

from __future__ import annotations

from typing import Any

from ..params import ARG_ORDER, DEFAULTS, HIRES_MODES, NUMBER_RANGES, PRESETS, PRESETS_BY_NAME, label
from . import webui

SLIDER_STEPS = {"scale": 0.1, "tau": 0.05, "alpha": 0.01, "start": 0.01, "end": 0.01}
PRESET_FIELDS = ("scale", "tau", "alpha", "start", "end")


def preset_values(name: str) -> list[float]:
    """The numbers a preset fills in, in ``PRESET_FIELDS`` order."""
    preset = PRESETS_BY_NAME[name].apply(DEFAULTS)
    return [getattr(preset, field) for field in PRESET_FIELDS]


def slider(script: Any, name: str) -> Any:
    import gradio as gr

    text, low, high = NUMBER_RANGES[name]
    return gr.Slider(
        label=text,
        minimum=low,
        maximum=high,
        step=SLIDER_STEPS[name],
        value=getattr(DEFAULTS, name),
        elem_id=script.elem_id(name),
    )


def build(script: Any) -> list[Any]:
    """Build the accordion; return its controls in ``ARG_ORDER``, set the paste fields."""
    import gradio as gr
    from modules.ui_components import InputAccordion

    controls: dict[str, Any] = {}
    with InputAccordion(False, label="NAG", elem_id=script.elem_id("enabled")) as controls["enabled"]:
        preset = gr.Dropdown(
            label="NAG preset",
            choices=[p.name for p in PRESETS],
            value=PRESETS[0].name,
            elem_id=script.elem_id("preset"),
        )
        controls["negative_prompt"] = gr.Textbox(
            label=label("negative_prompt"),
            lines=2,
            placeholder="Empty: the main negative prompt",
            elem_id=script.elem_id("negative_prompt"),
        )
        with gr.Row():
            for name in ("scale", "tau", "alpha"):
                controls[name] = slider(script, name)
        with gr.Row():
            for name in ("start", "end"):
                controls[name] = slider(script, name)
        controls["hires_mode"] = gr.Radio(
            label=label("hires_mode"),
            choices=list(HIRES_MODES),
            value=DEFAULTS.hires_mode,
            elem_id=script.elem_id("hires_mode"),
        )
    preset.change(fn=preset_values, inputs=[preset], outputs=[controls[name] for name in PRESET_FIELDS])
    # Values paste by their infotext keys (which "Send to" also matches); NAG is on only if the
    # pasted parameters carry it.
    script.infotext_fields = [(controls["enabled"], webui.infotext_has_nag)] + [(controls[n], label(n)) for n in ARG_ORDER[1:]]
    script.paste_field_names = [label(name) for name in ARG_ORDER[1:]]
    return [controls[name] for name in ARG_ORDER]
