"""NAG parameters: one validated model, its presets, and its UI, API and infotext forms."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from typing import Any


class NagParamError(ValueError):
    """A NAG parameter has the wrong type or is out of range; the message names the field."""


HIRES_MODES = ("Both passes", "First pass only", "Hires pass only")

# name: (UI/infotext label, minimum, maximum)
NUMBER_RANGES: dict[str, tuple[str, float, float]] = {
    "scale": ("NAG scale", 1.0, 20.0),
    "tau": ("NAG tau", 1.0, 10.0),
    "alpha": ("NAG alpha", 0.0, 1.0),
    "start": ("NAG start", 0.0, 1.0),
    "end": ("NAG end", 0.0, 1.0),
    "sigma_end": ("NAG sigma end", 0.0, 20.0),
}
TEXT_LABELS = {
    "enabled": "NAG enabled",
    "negative_prompt": "NAG negative prompt",
    "hires_mode": "NAG hires",
}

# The order of the script's UI controls, which is also the documented API argument list. New
# arguments go at the end, so that older lists keep their meaning.
ARG_ORDER = ("enabled", "scale", "tau", "alpha", "start", "end", "negative_prompt", "hires_mode", "sigma_end")


def label(name: str) -> str:
    """The human label of a field, also its infotext key."""
    return NUMBER_RANGES[name][0] if name in NUMBER_RANGES else TEXT_LABELS[name]


def _number(name: str, value: Any) -> float:
    text, low, high = NUMBER_RANGES[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not low <= value <= high:
        raise NagParamError(f"{text} ({name}) must be a finite number from {low:g} to {high:g}, got {value!r}")
    return float(value)


def _hires_mode(value: Any) -> str:
    if isinstance(value, str):
        for mode in HIRES_MODES:
            if value.strip().lower() == mode.lower():
                return mode
    raise NagParamError(f"{label('hires_mode')} (hires_mode) must be one of {', '.join(HIRES_MODES)}, got {value!r}")


@dataclass(frozen=True)
class NagParams:
    """Validated NAG settings. ``scale`` follows the authors' code: 1 means no guidance and
    the paper's φ is ``scale − 1``. ``start``/``end`` are fractions of the sampling steps;
    ``sigma_end`` also ends guidance at the first step whose σ is below it (0: no σ limit).
    An empty ``negative_prompt`` means: use the main negative prompt."""

    enabled: bool = False
    scale: float = 5.0
    tau: float = 2.5
    alpha: float = 0.25
    start: float = 0.0
    end: float = 1.0
    negative_prompt: str = ""
    hires_mode: str = HIRES_MODES[0]
    sigma_end: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise NagParamError(f"{label('enabled')} (enabled) must be true or false, got {self.enabled!r}")
        for name in NUMBER_RANGES:
            object.__setattr__(self, name, _number(name, getattr(self, name)))
        if not isinstance(self.negative_prompt, str):
            raise NagParamError(f"{label('negative_prompt')} (negative_prompt) must be text, got {self.negative_prompt!r}")
        object.__setattr__(self, "hires_mode", _hires_mode(self.hires_mode))
        if self.start >= self.end:
            raise NagParamError(f"NAG start (start) must be below NAG end (end), got start {self.start:g} and end {self.end:g}")

    def with_overrides(self, overrides: Mapping[str, Any]) -> NagParams:
        """A copy with some fields replaced, validated like any other."""
        _reject_unknown(overrides)
        return replace(self, **overrides)

    def guides_pass(self, is_hires_pass: bool) -> bool:
        """Whether this sampling pass is guided, by ``hires_mode``."""
        if not self.enabled:
            return False
        return self.hires_mode == HIRES_MODES[0] or (self.hires_mode == HIRES_MODES[2]) == is_hires_pass


FIELD_NAMES = tuple(f.name for f in fields(NagParams))
DEFAULTS = NagParams()


def _reject_unknown(keys: Mapping[str, Any]) -> None:
    unknown = sorted(str(k) for k in keys if k not in FIELD_NAMES)
    if unknown:
        raise NagParamError(f"unknown NAG argument(s) {', '.join(unknown)}; known: {', '.join(ARG_ORDER)}")


def from_dict(values: Mapping[str, Any]) -> NagParams:
    """Build from named values (an API dict such as ``{"enabled": true, "scale": 5}``, an argument
    list by name, XYZ overrides).

    Only ``enabled`` true turns NAG on; otherwise nothing else is read or validated, so whatever a
    host fills in for a request that leaves NAG out (``None`` for an empty Gradio 4 textbox,
    another extension's misaligned arguments) reads as off. On an enabled NAG, a ``None`` value
    takes the field's default, and unknown keys and wrong values fail, naming the field."""
    if values.get("enabled") is not True:
        return DEFAULTS
    _reject_unknown(values)
    return DEFAULTS.with_overrides({name: value for name, value in values.items() if value is not None})


def to_dict(params: NagParams) -> dict[str, Any]:
    return asdict(params)


def named_args(args: Sequence[Any]) -> dict[str, Any]:
    """The script's argument list by name: a single dict element in first place, or the positional
    ``ARG_ORDER`` list (a shorter list leaves the rest missing). Values are not checked here."""
    if args and isinstance(args[0], Mapping):
        return dict(args[0])
    if len(args) > len(ARG_ORDER) and args[0] is True:
        raise NagParamError(f"NAG takes at most {len(ARG_ORDER)} arguments ({', '.join(ARG_ORDER)}), got {len(args)}")
    return dict(zip(ARG_ORDER, args, strict=False))  # a longer list: the rest is not NAG's


def from_args(args: Sequence[Any], overrides: Mapping[str, Any] | None = None) -> NagParams:
    """Build from the script's argument list (see ``named_args``), then ``overrides`` (XYZ cells)."""
    return from_dict({**named_args(args), **(overrides or {})})


def ignored_enabled(args: Sequence[Any], overrides: Mapping[str, Any] | None = None) -> str:
    """Why an ``enabled`` that is neither a boolean nor missing left NAG off ("" when it is either)."""
    value = {**named_args(args), **(overrides or {})}.get("enabled")
    if value is None or isinstance(value, bool):
        return ""
    return (
        f"off: {label('enabled')} (enabled) is {value!r}, not true or false "
        "(the request's NAG arguments, or another extension's misaligned ones); nothing else was read"
    )


def to_args(params: NagParams) -> list[Any]:
    return [getattr(params, name) for name in ARG_ORDER]


# Written only when set, so that images made without them keep the infotext they always had.
OPTIONAL_INFOTEXT = ("sigma_end",)


def infotext_keys() -> set[str]:
    """Every infotext key NAG may write."""
    return {label(name) for name in ARG_ORDER[1:]}


def to_infotext(params: NagParams) -> dict[str, Any]:
    """Infotext entries for an image made with NAG: every field (the optional ones when they differ
    from their default), so that pasting restores the exact settings. Values are raw (the host
    quotes them when writing), except an empty NAG negative prompt, written as ``""`` because the
    host's reader drops empty values."""
    entries: dict[str, Any] = {
        label(name): getattr(params, name)
        for name in ARG_ORDER[1:]
        if name not in OPTIONAL_INFOTEXT or getattr(params, name) != getattr(DEFAULTS, name)
    }
    entries[label("negative_prompt")] = params.negative_prompt or '""'
    return entries


def _pasted_optional(name: str) -> Any:
    """The paste field of an optional infotext entry: its value, or its default when the pasted
    parameters carry NAG without it; None (leave the control as it is) when they carry no NAG."""

    def value(entries: Mapping[str, str]) -> Any:
        if label("scale") not in entries:
            return None
        return entries.get(label(name), getattr(DEFAULTS, name))

    return value


# One object per field for every tab: "Send to" pairs the two tabs' fields by their keys.
_PASTE_KEYS: dict[str, Any] = {name: _pasted_optional(name) for name in OPTIONAL_INFOTEXT}


def paste_key(name: str) -> Any:
    """What a control's paste field reads: its infotext key, or for an optional entry a function of the
    pasted parameters."""
    return _PASTE_KEYS.get(name, label(name))


def from_infotext(entries: Mapping[str, str]) -> NagParams:
    """Read parsed (already unquoted) infotext. No ``NAG scale`` key means NAG was off; a
    missing key reads as its default."""
    if label("scale") not in entries:
        return DEFAULTS
    values: dict[str, Any] = {"enabled": True}
    for name in ARG_ORDER[1:]:
        if label(name) not in entries:
            continue
        text = entries[label(name)]
        if name in NUMBER_RANGES:
            try:
                text = float(text)
            except (TypeError, ValueError):
                raise NagParamError(f"{label(name)} ({name}) must be a number, got {text!r}") from None
        values[name] = text
    return from_dict(values)


@dataclass(frozen=True)
class Preset:
    """Numbers a preset fills in, and where they come from."""

    name: str
    scale: float
    tau: float
    alpha: float
    end: float
    source: str
    sigma_end: float = 0.0

    def apply(self, params: NagParams) -> NagParams:
        return replace(params, scale=self.scale, tau=self.tau, alpha=self.alpha, start=0.0, end=self.end, sigma_end=self.sigma_end)


WORKFLOWS = "the authors' ComfyUI-NAG workflows/ (ef8a641)"

PRESETS: tuple[Preset, ...] = (
    Preset("Default", 5.0, 2.5, 0.25, 1.0, "ComfyUI-NAG node defaults (authors' ComfyUI code)"),
    Preset(
        "SD1.x",
        5.0,
        2.5,
        0.38,
        1.0,
        f"{WORKFLOWS} NAG-SD15 (20 steps, euler/simple, CFG 7): scale 5, tau 2.5, alpha 0.38, nag_sigma_end 4",
        sigma_end=4.0,
    ),
    Preset(
        "SDXL, 20+ steps with CFG",
        7.0,
        2.5,
        0.25,
        1.0,
        "author in ComfyUI-NAG #10: for 20+ step SDXL start with nag_scale above 6; tau/alpha at the node defaults",
    ),
    Preset(
        "SDXL fine-tune / v-pred",
        7.0,
        2.5,
        0.125,
        1.0,
        "author in ComfyUI-NAG #10: on fine-tuned or v-pred SDXL lower tau and alpha to 2.5 and 0.125",
    ),
    Preset(
        "Few-step / CFG 1 (Turbo, Lightning, DMD2, LCM)",
        3.0,
        2.5,
        0.5,
        1.0,
        "authors' README SDXL example (DMD2 4-step, LCM, guidance_scale 0): nag_scale 3, with the diffusers defaults tau 2.5, alpha 0.5",
    ),
    Preset(
        "Flux-dev / Flux-schnell (CFG 1)",
        5.0,
        2.5,
        0.25,
        1.0,
        f"{WORKFLOWS} NAG-Flux-Dev (25 steps) and NAG-Flux-Schnell (4 steps), euler/simple, CFG 1: scale 5, tau 2.5, alpha 0.25, "
        "nag_sigma_end 0.75",
        sigma_end=0.75,
    ),
    Preset(
        "Flux Kontext",
        3.0,
        2.5,
        0.25,
        1.0,
        f"{WORKFLOWS} NAG-Flux-Kontext-Dev (20 steps, euler/simple, CFG 1): scale 3, tau 2.5, alpha 0.25, nag_sigma_end 0.75",
        sigma_end=0.75,
    ),
    Preset(
        "Chroma",
        5.0,
        2.5,
        0.25,
        1.0,
        f"{WORKFLOWS} NAG-Chroma (30 steps, euler/beta, CFG 4): scale 5, tau 2.5, alpha 0.25, nag_sigma_end 0.75",
        sigma_end=0.75,
    ),
    Preset(
        "SD3.5 Turbo (CFG 1)",
        5.0,
        2.5,
        0.25,
        1.0,
        f"{WORKFLOWS} NAG-SD3.5-Turbo (8 steps, euler/simple, CFG 1): scale 5, tau 2.5, alpha 0.25, nag_sigma_end 0.75",
        sigma_end=0.75,
    ),
    Preset(
        "Wan (CFG)",
        6.0,
        2.5,
        0.25,
        1.0,
        f"{WORKFLOWS} NAG-Wan (Wan 2.1 T2V 1.3B, 20 steps, uni_pc/simple, shift 5, CFG 8): scale 6, tau 2.5, alpha 0.25, "
        "nag_sigma_end 0",
    ),
    Preset(
        "Wan fast (few steps, CFG 1)",
        11.0,
        3.5,
        0.5,
        1.0,
        f"{WORKFLOWS} NAG-Wan-Fast (Wan 2.1 T2V 14B with the CausVid LoRA, 4 steps, uni_pc/simple, shift 5, CFG 1): "
        "scale 11, tau 3.5, alpha 0.5, nag_sigma_end 0.75",
        sigma_end=0.75,
    ),
    Preset(
        "Paper (SDXL)",
        3.0,
        2.5,
        0.5,
        1.0,
        "paper's SDXL setting phi 2, tau 2.5, alpha 0.5 (quoted in ComfyUI-NAG #10); phi 2 is scale 3",
    ),
)
PRESETS_BY_NAME = {preset.name: preset for preset in PRESETS}
