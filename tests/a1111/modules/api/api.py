"""Mirrors modules/api/api.py (v1.10.1): script-argument assembly, the exception handling of
``api_middleware``, and the txt2img route."""

from __future__ import annotations

from contextlib import closing
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import HTTPException
from fastapi.responses import JSONResponse

from modules import processing, scripts, sd_samplers, shared
from modules.api import models


def script_name_to_index(name, scripts):
    """Mirrors api.script_name_to_index (v1.10.1): by lower-cased title, 422 if absent."""
    try:
        return [script.title().lower() for script in scripts].index(name.lower())
    except Exception as e:
        raise HTTPException(status_code=422, detail=f"Script '{name}' not found") from e


def validate_sampler_name(name):
    """Mirrors api.validate_sampler_name (v1.10.1): 400 for a name the registry does not have."""
    if sd_samplers.all_samplers_map.get(name) is None:
        raise HTTPException(status_code=400, detail="Sampler not found")
    return name


def handle_exception(e: Exception) -> tuple[int, dict]:
    """Mirrors the ``handle_exception`` of api.api_middleware (v1.10.1): ``(status, JSON body)``."""
    err = {"error": type(e).__name__, "detail": vars(e).get("detail", ""), "body": vars(e).get("body", ""), "errors": str(e)}
    return vars(e).get("status_code", 500), err


def api_middleware(app: FastAPI) -> None:
    """Mirrors api.api_middleware (v1.10.1) without its ``log_and_time`` middleware (a timing header)
    and the console report: the ``exception_handling`` middleware and the two exception handlers
    answer every exception with ``handle_exception``'s body."""

    def respond(e: Exception) -> JSONResponse:
        status, err = handle_exception(e)
        return JSONResponse(status_code=status, content=jsonable_encoder(err))

    @app.middleware("http")
    async def exception_handling(request: Request, call_next):
        try:
            return await call_next(request)
        except Exception as e:
            return respond(e)

    @app.exception_handler(Exception)
    async def fastapi_exception_handler(request: Request, e: Exception):
        return respond(e)

    @app.exception_handler(HTTPException)
    async def http_exception_handler(request: Request, e: HTTPException):
        return respond(e)


def init_script_args(request, default_script_args, selectable_scripts, selectable_idx, script_runner, *, input_script_args=None):
    """Mirrors Api.init_script_args (v1.10.1): copy ``alwayson_scripts[title]["args"]`` into
    ``script_args[args_from + i]``. An entry is read only when ``"args" in entry``: a list without the
    string "args" in it, or a dict without the key, is passed over without a word."""
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
    """Mirrors api.Api (v1.10.1), reduced to the script-argument helpers and, given an app, the
    ``/sdapi/v1/txt2img`` route (no ``--api-auth``, task queue or other routes)."""

    def __init__(self, app: FastAPI | None = None) -> None:
        """Mirrors Api.__init__ (v1.10.1): ``api_middleware``, the routes, then the default script
        arguments of ``scripts.scripts_txt2img``/``scripts_img2img`` (here: of those that are set)."""
        if app is not None:
            api_middleware(app)
            app.add_api_route("/sdapi/v1/txt2img", self.text2imgapi, methods=["POST"])
        runners = (scripts.scripts_txt2img, scripts.scripts_img2img)
        self.default_script_arg_txt2img, self.default_script_arg_img2img = (self.init_default_script_args(r) if r else [] for r in runners)

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

    def get_selectable_script(self, script_name, script_runner):
        """Mirrors Api.get_selectable_script (v1.10.1)."""
        if script_name is None or script_name == "":
            return None, None
        script_idx = script_name_to_index(script_name, script_runner.selectable_scripts)
        return script_runner.selectable_scripts[script_idx], script_idx

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

    def text2imgapi(self, txt2imgreq: models.StableDiffusionTxt2ImgProcessingAPI) -> dict[str, Any]:
        """Mirrors Api.text2imgapi (v1.10.1): the request's fields become the processing object's, its
        ``alwayson_scripts`` and ``script_args`` go through ``init_script_args``, ``p.is_api`` is set and
        ``process_images`` runs; the reply carries the request as ``parameters`` and ``Processed.js()``
        as ``info``. Left out: the task queue, the ``infotext`` field, saving, selectable scripts, and
        the images (the stand-in's are latents: none are sent)."""
        script_runner = scripts.scripts_txt2img
        selectable_scripts, selectable_script_idx = self.get_selectable_script(txt2imgreq.script_name, script_runner)
        if selectable_scripts is not None:
            raise NotImplementedError("the stand-in's txt2img route runs no selectable script")
        sampler_name = txt2imgreq.sampler_name or txt2imgreq.sampler_index
        sampler, scheduler = sd_samplers.get_sampler_and_scheduler(sampler_name, txt2imgreq.scheduler)
        args = {**vars(txt2imgreq), "sampler_name": validate_sampler_name(sampler)}
        if not args["scheduler"] and scheduler != "Automatic":
            args["scheduler"] = scheduler
        for name in ("script_name", "script_args", "alwayson_scripts", "infotext", "send_images", "save_images", "force_task_id"):
            args.pop(name)
        args.pop("sampler_index")  # the host passes it on (ignored there); the stand-in's processing has no such field
        defaults = self.default_script_arg_txt2img
        script_args = self.init_script_args(txt2imgreq, defaults, selectable_scripts, selectable_script_idx, script_runner)
        with closing(processing.StableDiffusionProcessingTxt2Img(**args)) as p:
            p.is_api = True
            p.scripts = script_runner
            p.script_args = tuple(script_args)
            shared.state.begin(job="scripts_txt2img")
            processed = processing.process_images(p)
        return {"images": [], "parameters": vars(txt2imgreq), "info": processed.js()}
