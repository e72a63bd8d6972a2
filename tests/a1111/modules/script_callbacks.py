"""Mirrors modules/script_callbacks.py (v1.10.1): callback registration, ordering and dispatch."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any

from modules import errors, shared


@dataclass
class ScriptCallback:
    """Mirrors script_callbacks.ScriptCallback (v1.10.1)."""

    script: str
    callback: Any
    name: str = "unnamed"


class CFGDenoiserParams:
    """Mirrors script_callbacks.CFGDenoiserParams (v1.10.1)."""

    def __init__(self, x, image_cond, sigma, sampling_step, total_sampling_steps, text_cond, text_uncond, denoiser=None):
        self.x, self.image_cond, self.sigma = x, image_cond, sigma
        self.sampling_step, self.total_sampling_steps = sampling_step, total_sampling_steps
        self.text_cond, self.text_uncond, self.denoiser = text_cond, text_uncond, denoiser


class CFGDenoisedParams:
    """Mirrors script_callbacks.CFGDenoisedParams (v1.10.1)."""

    def __init__(self, x, sampling_step, total_sampling_steps, inner_model):
        self.x, self.sampling_step, self.total_sampling_steps, self.inner_model = x, sampling_step, total_sampling_steps, inner_model


class AfterCFGCallbackParams:
    """Mirrors script_callbacks.AfterCFGCallbackParams (v1.10.1)."""

    def __init__(self, x, sampling_step, total_sampling_steps):
        self.x, self.sampling_step, self.total_sampling_steps = x, sampling_step, total_sampling_steps


CATEGORIES = [
    "app_started",
    "model_loaded",
    "ui_tabs",
    "ui_train_tabs",
    "ui_settings",
    "before_image_saved",
    "image_saved",
    "extra_noise",
    "cfg_denoiser",
    "cfg_denoised",
    "cfg_after_cfg",
    "before_component",
    "after_component",
    "image_grid",
    "infotext_pasted",
    "script_unloaded",
    "before_ui",
    "on_reload",
    "list_optimizers",
    "list_unets",
    "before_token_counter",
]
callback_map: dict[str, list[ScriptCallback]] = {f"callbacks_{c}": [] for c in CATEGORIES}
ordered_callbacks_map: dict[str, list[ScriptCallback]] = {}


def _caller_file() -> str:
    """The first frame outside this file, as the host finds it with ``inspect.stack()``."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    return frame.f_code.co_filename if frame is not None else "unknown file"


def report_exception(c: ScriptCallback, job: str) -> None:
    """Mirrors script_callbacks.report_exception (v1.10.1)."""
    errors.report(f"Error executing callback {job} for {c.script}", exc_info=True)


def add_callback(callbacks: list, fun, *, name: str | None = None, category: str = "unknown", filename: str | None = None) -> None:
    """Mirrors script_callbacks.add_callback (v1.10.1); every file counts as extension ``base``."""
    filename = filename or _caller_file()
    callback_name = f"base/{os.path.basename(filename)}/{category}" + (f"/{name}" if name is not None else "")
    unique = callback_name
    for index in range(1000):
        if not any(x.name == unique for x in callbacks):
            break
        unique = f"{callback_name}-{index + 1}"
    callbacks.append(ScriptCallback(filename, fun, unique))


def sort_callbacks(category: str, unordered_callbacks: list, *, enable_user_sort: bool = True) -> list:
    """Mirrors script_callbacks.sort_callbacks (v1.10.1) without extension metadata: registration order,
    then the names in ``opts.prioritized_callbacks_<category>`` moved to the front."""
    callbacks = unordered_callbacks.copy()
    if enable_user_sort:
        for name in reversed(getattr(shared.opts, f"prioritized_callbacks_{category}", None) or []):
            found = [c for c in callbacks if c.name == name]
            callbacks = found + [c for c in callbacks if c.name != name]
    return callbacks


def ordered_callbacks(category: str, unordered_callbacks: list | None = None, *, enable_user_sort: bool = True) -> list:
    """Mirrors script_callbacks.ordered_callbacks (v1.10.1), with its length-only staleness check."""
    if unordered_callbacks is None:
        unordered_callbacks = callback_map.get("callbacks_" + category, [])
    if not enable_user_sort:
        return sort_callbacks(category, unordered_callbacks, enable_user_sort=False)
    callbacks = ordered_callbacks_map.get(category)
    if callbacks is not None and len(callbacks) == len(unordered_callbacks):
        return callbacks
    callbacks = ordered_callbacks_map[category] = sort_callbacks(category, unordered_callbacks)
    return callbacks


def clear_callbacks() -> None:
    """Mirrors script_callbacks.clear_callbacks (v1.10.1)."""
    for callback_list in callback_map.values():
        callback_list.clear()
    ordered_callbacks_map.clear()


def _run(category: str, *args, reverse: bool = False) -> None:
    """Call every callback of ``category``; an Exception is reported and skipped, a BaseException propagates."""
    callbacks = ordered_callbacks(category)
    for c in reversed(callbacks) if reverse else callbacks:
        try:
            c.callback(*args)
        except Exception:
            report_exception(c, category)


def app_started_callback(demo, app) -> None:
    """Mirrors script_callbacks.app_started_callback (v1.10.1)."""
    _run("app_started", demo, app)


def cfg_denoiser_callback(params: CFGDenoiserParams) -> None:
    """Mirrors script_callbacks.cfg_denoiser_callback (v1.10.1)."""
    _run("cfg_denoiser", params)


def cfg_denoised_callback(params: CFGDenoisedParams) -> None:
    """Mirrors script_callbacks.cfg_denoised_callback (v1.10.1)."""
    _run("cfg_denoised", params)


def cfg_after_cfg_callback(params: AfterCFGCallbackParams) -> None:
    """Mirrors script_callbacks.cfg_after_cfg_callback (v1.10.1)."""
    _run("cfg_after_cfg", params)


def infotext_pasted_callback(infotext: str, params: dict) -> None:
    """Mirrors script_callbacks.infotext_pasted_callback (v1.10.1)."""
    _run("infotext_pasted", infotext, params)


def script_unloaded_callback() -> None:
    """Mirrors script_callbacks.script_unloaded_callback (v1.10.1): reverse order."""
    _run("script_unloaded", reverse=True)


def before_ui_callback() -> None:
    """Mirrors script_callbacks.before_ui_callback (v1.10.1): reverse order."""
    _run("before_ui", reverse=True)


def remove_current_script_callbacks() -> None:
    """Mirrors script_callbacks.remove_current_script_callbacks (v1.10.1)."""
    filename = _caller_file()
    if filename == "unknown file":
        return
    for callback_list in [*callback_map.values(), *ordered_callbacks_map.values()]:
        for cb in [cb for cb in callback_list if cb.script == filename]:
            callback_list.remove(cb)


def remove_callbacks_for_function(callback_func) -> None:
    """Mirrors script_callbacks.remove_callbacks_for_function (v1.10.1): ``==`` match, both maps."""
    for callback_list in [*callback_map.values(), *ordered_callbacks_map.values()]:
        for cb in [cb for cb in callback_list if cb.callback == callback_func]:
            callback_list.remove(cb)


def _register(category: str, callback, name: str | None) -> None:
    add_callback(callback_map[f"callbacks_{category}"], callback, name=name, category=category, filename=_caller_file())


def on_app_started(callback, *, name: str | None = None) -> None:
    """Mirrors script_callbacks.on_app_started (v1.10.1)."""
    _register("app_started", callback, name)


def on_cfg_denoiser(callback, *, name: str | None = None) -> None:
    """Mirrors script_callbacks.on_cfg_denoiser (v1.10.1)."""
    _register("cfg_denoiser", callback, name)


def on_cfg_denoised(callback, *, name: str | None = None) -> None:
    """Mirrors script_callbacks.on_cfg_denoised (v1.10.1)."""
    _register("cfg_denoised", callback, name)


def on_cfg_after_cfg(callback, *, name: str | None = None) -> None:
    """Mirrors script_callbacks.on_cfg_after_cfg (v1.10.1)."""
    _register("cfg_after_cfg", callback, name)


def on_infotext_pasted(callback, *, name: str | None = None) -> None:
    """Mirrors script_callbacks.on_infotext_pasted (v1.10.1)."""
    _register("infotext_pasted", callback, name)


def on_before_ui(callback, *, name: str | None = None) -> None:
    """Mirrors script_callbacks.on_before_ui (v1.10.1)."""
    _register("before_ui", callback, name)


def on_script_unloaded(callback, *, name: str | None = None) -> None:
    """Mirrors script_callbacks.on_script_unloaded (v1.10.1)."""
    _register("script_unloaded", callback, name)
