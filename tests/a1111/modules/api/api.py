"""Mirrors modules/api/api.py (v1.10.1): script-argument assembly and the error shape of ``api_middleware``."""

from __future__ import annotations

from typing import Any


class HTTPException(Exception):
    """Stand-in for fastapi.HTTPException: ``status_code`` and ``detail``."""

    def __init__(self, status_code: int, detail: Any = None):
        super().__init__(detail)
        self.status_code, self.detail = status_code, detail


def script_name_to_index(name, scripts):
    """Mirrors api.script_name_to_index (v1.10.1): by lower-cased title, 422 if absent."""
    try:
        return [script.title().lower() for script in scripts].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def handle_exception(e: Exception) -> tuple[int, dict]:
    """Mirrors the ``handle_exception`` of api.api_middleware (v1.10.1): ``(status, JSON body)``."""
    err = {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""), "errors": str(e)}
    return vars(e).get("status_code", 500), err


def init_script_args(request, default_script_args, selectable_scripts, selectable_idx, script_runner, *, input_script_args=None):
    """Mirrors Api.init_script_args (v1.10.1): copy ``alwayson_scripts[title]["args"]`` into ``script_args[args_from + i]``."""
    script_args = default_script_args.copy()
    for index, value in (input_script_args or {}).items():
        script_args[index] = value
    if selectable_scripts:
        script_args[selectable_scripts.args_from : selectable_scripts.args_to] = request.script_args
        script_args[0] = selectable_idx + 1
    for name, entry in (request.alwayson_scripts or {}).items():
        script = script_runner.scripts[script_name_to_index(name, script_runner.scripts)]
        if script.alwayson is False:
            raise HTTPException(status_code=422, detail="Cannot have a selectable script in the always on scripts params")
        if "args" in entry:
            for idx in range(min(script.args_to - script.args_from, len(entry["args"]))):
                script_args[script.args_from + idx] = entry["args"][idx]
    return script_args


class Api:
    """Mirrors api.Api (v1.10.1), reduced to the script-argument helpers."""

    def init_default_script_args(self, script_runner):
        """Mirrors Api.init_default_script_args (v1.10.1; Forge's is the same): None everywhere, 0 at
        index 0, then, inside ``gr.Blocks()``, each script's ``ui()`` called again (twice) and the new
        components' ``.value`` slice-assigned over ``[args_from:args_to]``. A ``ui()`` that now returns
        a different number of components grows or shrinks the list, shifting every later script's
        arguments."""
        import gradio as gr

        script_args = [None] * max([1, *[s.args_to for s in script_runner.scripts]])
        script_args[0] = 0
        with gr.Blocks():
            for script in script_runner.scripts:
                if script.ui(script.is_img2img):
                    script_args[script.args_from : script.args_to] = [elem.value for elem in script.ui(script.is_img2img)]
        return script_args

    def get_script(self, script_name, script_runner):
        """Mirrors Api.get_script (v1.10.1)."""
        if script_name is None or script_name == "":
            return None, None
        return script_runner.scripts[script_name_to_index(script_name, script_runner.scripts)]

    def init_script_args(self, request, default_script_args, selectable_scripts, selectable_idx, script_runner, *, input_script_args=None):
        """Mirrors Api.init_script_args (v1.10.1)."""
        return init_script_args(
            request, default_script_args, selectable_scripts, selectable_idx, script_runner, input_script_args=input_script_args
        )
