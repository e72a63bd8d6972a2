"""Test helpers around the A1111 stand-in (not host code): reset the host's global state, load a fake model,
attach alwayson scripts with their arguments, and build processing objects."""

from __future__ import annotations

from typing import Any

from modules import errors, processing, script_callbacks, scripts, sd_models, shared


def reset_host() -> None:
    """Fresh host globals: default opts, idle state, no callbacks, empty cond caches, no models, no reported errors."""
    shared.opts.data.clear()
    shared.opts.data.update({k: (list(v) if isinstance(v, list) else v) for k, v in shared.OPTION_DEFAULTS.items()})
    shared.state.begin()
    shared.sd_model = None
    script_callbacks.clear_callbacks()
    errors.reported.clear()
    sd_models.checkpoints_list.clear()
    sd_models.checkpoint_models.clear()
    scripts.scripts_data.clear()
    processing.StableDiffusionProcessing.cached_c = [None, None]
    processing.StableDiffusionProcessing.cached_uc = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]
    processing.StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]


def load(model: Any) -> Any:
    """Load ``model`` as the selected checkpoint (``shared.sd_model``), as the host's model load does."""
    return sd_models.load_model(model)


def script_runner(*scripts_and_args: tuple[scripts.Script, list], is_img2img: bool = False) -> tuple[scripts.ScriptRunner, list]:
    """A ScriptRunner with the given alwayson script instances, and the job's ``script_args``.

    Argument layout as the host's UI builds it: index 0 is the selectable-script index (0 = none), then each
    script's arguments in order, ``script.args_from``/``args_to`` pointing at its slice."""
    runner = scripts.ScriptRunner()
    script_args: list = [0]
    for script, args in scripts_and_args:
        script.filename = script.filename or f"/extensions/test/scripts/{type(script).__name__.lower()}.py"
        script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
        script.tabname = "img2img" if is_img2img else "txt2img"
        script.alwayson = True
        script.args_from = len(script_args)
        script_args += list(args)
        script.args_to = len(script_args)
        runner.scripts.append(script)
        runner.alwayson_scripts.append(script)
    return runner, script_args


def ui_runner(*all_scripts: scripts.Script, is_img2img: bool = False) -> scripts.ScriptRunner:
    """A ScriptRunner with these scripts (alwayson or selectable, by their ``show``), its UI built as
    the host builds it (``setup_ui`` inside ``gr.Blocks()``): ``args_from``/``args_to`` and ``inputs``
    (index 0: the selectable-script dropdown) as in the WebUI."""
    import gradio as gr

    runner = scripts.ScriptRunner()
    for script in all_scripts:
        script.filename = script.filename or f"/extensions/test/scripts/{type(script).__name__.lower()}.py"
        script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
        script.tabname = "img2img" if is_img2img else "txt2img"
        script.alwayson = script.show(is_img2img) is scripts.AlwaysVisible
        runner.scripts.append(script)
        (runner.alwayson_scripts if script.alwayson else runner.selectable_scripts).append(script)
    with gr.Blocks():
        runner.setup_ui()
    return runner


JOB_DEFAULTS = {
    "prompt": "a photo of a cat",
    "negative_prompt": "blurry",
    "width": 64,
    "height": 64,
    "steps": 4,
    "sampler_name": "Euler",
    "seed": 1,
}


def _job(kind: type, runner: scripts.ScriptRunner | None, script_args: list | None, fields: dict[str, Any]) -> Any:
    """A ``p`` as modules/txt2img.py and modules/img2img.py build it (small defaults), scripts attached."""
    p = kind(**{**JOB_DEFAULTS, **fields})
    p.scripts, p.script_args = runner, script_args if script_args is not None else [0]
    return p


def txt2img(
    runner: scripts.ScriptRunner | None = None, script_args: list | None = None, **kwargs: Any
) -> processing.StableDiffusionProcessingTxt2Img:
    return _job(processing.StableDiffusionProcessingTxt2Img, runner, script_args, kwargs)


def img2img(
    runner: scripts.ScriptRunner | None = None, script_args: list | None = None, **kwargs: Any
) -> processing.StableDiffusionProcessingImg2Img:
    return _job(processing.StableDiffusionProcessingImg2Img, runner, script_args, kwargs)


def run(p: processing.StableDiffusionProcessing) -> processing.Processed:
    """Run a job the way the UI does: ``with closing(p): process_images(p)`` (no selectable script)."""
    try:
        return processing.process_images(p)
    finally:
        p.close()
