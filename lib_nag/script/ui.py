"""The NAG accordion, the same in every host (Gradio 3 in A1111, Gradio 4 in Forge)."""

from __future__ import annotations

from typing import Any

from ..params import ARG_ORDER, DEFAULTS, HIRES_MODES, NUMBER_RANGES, PRESETS, PRESETS_BY_NAME, label, paste_key
from ..webui.job import infotext_has_nag

# Each step divides every preset's value, so a slider shows the preset exactly (0.125 needs 0.005).
SLIDER_STEPS = {"scale": 0.1, "tau": 0.05, "alpha": 0.005, "start": 0.01, "end": 0.01, "sigma_end": 0.01}
PRESET_FIELDS = ("scale", "tau", "alpha", "start", "end", "sigma_end")
CUSTOM = "Custom"  # the preset dropdown's name for numbers that match no preset


def preset_values(name: str) -> list[Any]:
    """The numbers a preset fills in, in ``PRESET_FIELDS`` order; "Custom" changes nothing."""
    if name not in PRESETS_BY_NAME:
        import gradio as gr

        return [gr.update() for _ in PRESET_FIELDS]
    preset = PRESETS_BY_NAME[name].apply(DEFAULTS)
    return [getattr(preset, field) for field in PRESET_FIELDS]


def _matches(name: str, values: tuple[float, ...]) -> bool:
    numbers = preset_values(name)
    return all(abs(float(a) - b) < 1e-9 for a, b in zip(values, numbers, strict=True))


def preset_name(current: str, *values: float) -> Any:
    """The preset dropdown after the numbers changed (a preset picked, a paste, "Send to", a slider
    moved): kept while its preset still matches (two presets may share numbers), else the first
    matching preset, else "Custom". Unchanged is returned as a no-op update, so nothing loops."""
    import gradio as gr

    if None in values:
        return gr.update()
    if current in PRESETS_BY_NAME and _matches(current, values):
        return gr.update()
    name = next((preset.name for preset in PRESETS if _matches(preset.name, values)), CUSTOM)
    return gr.update() if name == current else name


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
            choices=[p.name for p in PRESETS] + [CUSTOM],
            value=PRESETS[0].name,
            elem_id=script.elem_id("preset"),
        )
        controls["negative_prompt"] = gr.Textbox(
            label=label("negative_prompt"),
            value="",  # Gradio 4's default is None, which its API and paste would hand on
            lines=2,
            placeholder="Empty: the main negative prompt",
            elem_id=script.elem_id("negative_prompt"),
        )
        with gr.Row():
            for name in ("scale", "tau", "alpha"):
                controls[name] = slider(script, name)
        with gr.Row():
            for name in ("start", "end", "sigma_end"):
                controls[name] = slider(script, name)
        controls["hires_mode"] = gr.Radio(
            label=label("hires_mode"),
            choices=list(HIRES_MODES),
            value=DEFAULTS.hires_mode,
            elem_id=script.elem_id("hires_mode"),
        )
    numbers = [controls[name] for name in PRESET_FIELDS]
    preset.change(fn=preset_values, inputs=[preset], outputs=numbers)
    for number in numbers:
        number.change(fn=preset_name, inputs=[preset, *numbers], outputs=[preset])
    # Values paste by their infotext keys (which "Send to" also matches); NAG is on only if the
    # pasted parameters carry it.
    script.infotext_fields = [(controls["enabled"], infotext_has_nag)] + [(controls[n], paste_key(n)) for n in ARG_ORDER[1:]]
    script.paste_field_names = [paste_key(name) for name in ARG_ORDER[1:]]
    return [controls[name] for name in ARG_ORDER]
