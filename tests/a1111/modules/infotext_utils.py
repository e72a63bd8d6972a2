"""Mirrors modules/infotext_utils.py (v1.10.1): infotext quoting, parsing, and paste-field application."""

from __future__ import annotations

import json
import re

from modules import errors, script_callbacks, shared

re_param = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
re_imagesize = re.compile(r"^(\d+)x(\d+)$")

# Defaults the host fills in for keys an infotext does not mention (a subset: the generation-related ones).
MISSING_DEFAULTS = {
    "Clip skip": "1",
    "Hires resize-1": 0,
    "Hires resize-2": 0,
    "Hires sampler": "Use same sampler",
    "Hires schedule type": "Use same scheduler",
    "Hires checkpoint": "Use same checkpoint",
    "Hires prompt": "",
    "Hires negative prompt": "",
    "RNG": "GPU",
    "Schedule type": "Automatic",
    "FP8 weight": "Disable",
    "Refiner switch by sampling steps": False,
}


def quote(text):
    """Mirrors infotext_utils.quote (v1.10.1): JSON-quote a value whose str has ',', newline or ':'."""
    if "," not in str(text) and "\n" not in str(text) and ":" not in str(text):
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    """Mirrors infotext_utils.unquote (v1.10.1)."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except Exception:
        return text


def parse_generation_parameters(x: str, skip_fields: list[str] | None = None) -> dict:
    """Mirrors infotext_utils.parse_generation_parameters (v1.10.1) without styles, hypernets or version back-compat.

    The last line holds the ``key: value`` pairs if the regex finds at least 3 there; lines before
    "Negative prompt:" are the prompt, the rest the negative prompt. Values are strings (quoted
    values unquoted), ``WxH`` values split into ``key-1``/``key-2``."""
    skip_fields = shared.opts.infotext_skip_pasting if skip_fields is None else skip_fields
    res, prompt, negative_prompt, done_with_prompt = {}, "", "", False
    *lines, lastline = x.strip().split("\n")
    if len(re_param.findall(lastline)) < 3:
        lines.append(lastline)
        lastline = ""
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            done_with_prompt, line = True, line[16:].strip()
        if done_with_prompt:
            negative_prompt += ("" if negative_prompt == "" else "\n") + line
        else:
            prompt += ("" if prompt == "" else "\n") + line
    for k, v in re_param.findall(lastline):
        try:
            if v[0] == '"' and v[-1] == '"':  # an empty value raises here and the key is dropped, as in the host
                v = unquote(v)
            m = re_imagesize.match(v)
            if m is not None:
                res[f"{k}-1"], res[f"{k}-2"] = m.group(1), m.group(2)
            else:
                res[k] = v
        except Exception:
            print(f'Error parsing "{k}: {v}"')
    res["Prompt"], res["Negative prompt"] = prompt, negative_prompt
    for key, value in MISSING_DEFAULTS.items():
        res.setdefault(key, value)
    for key in skip_fields:
        res.pop(key, None)
    return res


def apply_paste_fields(paste_fields, params: dict) -> list:
    """Mirrors the ``paste_func`` of infotext_utils.connect_paste (v1.10.1), returning values instead of gr.update.

    For each ``(component, key)``: a callable key is called with ``params`` (an Exception is reported
    and counts as None); a str key reads ``params.get(key)``. None → None ("leave the component
    unchanged"). A dict (what gr.update() returns in Gradio 3) passes through. Anything else is
    coerced to ``type(component.value)``: bool components treat "False" as False (any other value
    goes through ``bool()``), int components get ``float(v)``, others ``valtype(v)``; a failed
    coercion → None."""
    res = []
    for output, key in paste_fields:
        if callable(key):
            try:
                v = key(params)
            except Exception:
                errors.report(f"Error executing {key}", exc_info=True)
                v = None
        else:
            v = params.get(key)
        if v is None or isinstance(v, dict):
            res.append(v)
            continue
        try:
            valtype = type(output.value)
            res.append(False if valtype is bool and v == "False" else float(v) if valtype is int else valtype(v))
        except Exception:
            res.append(None)
    return res


def paste_infotext(infotext: str, paste_fields) -> list:
    """Mirrors connect_paste's ``paste_func`` (v1.10.1): parse, run the infotext_pasted callbacks, apply the fields."""
    params = parse_generation_parameters(infotext)
    script_callbacks.infotext_pasted_callback(infotext, params)
    return apply_paste_fields(paste_fields, params)
