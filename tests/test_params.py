import math

import pytest

from lib_nag import params as nag
from lib_nag.params import DEFAULTS, HIRES_MODES, PRESETS, NagParamError, NagParams


def test_defaults():
    numbers = (DEFAULTS.scale, DEFAULTS.tau, DEFAULTS.alpha, DEFAULTS.start, DEFAULTS.end)
    assert not DEFAULTS.enabled and numbers == (5.0, 2.5, 0.25, 0.0, 1.0)
    assert DEFAULTS.negative_prompt == "" and DEFAULTS.hires_mode == "Both passes"


@pytest.mark.parametrize(
    "field,value,message",
    [
        ("scale", 0.5, r"NAG scale \(scale\) must be a finite number from 1 to 20, got 0.5"),
        ("scale", 20.5, r"\(scale\).*from 1 to 20"),
        ("scale", math.nan, r"\(scale\).*got nan"),
        ("scale", math.inf, r"\(scale\)"),
        ("scale", "5", r"\(scale\).*got '5'"),
        ("scale", True, r"\(scale\)"),
        ("scale", None, r"\(scale\)"),
        ("tau", 0.99, r"NAG tau \(tau\).*from 1 to 10"),
        ("alpha", -0.1, r"NAG alpha \(alpha\).*from 0 to 1"),
        ("alpha", 1.5, r"\(alpha\)"),
        ("start", -0.01, r"NAG start \(start\)"),
        ("end", 1.01, r"NAG end \(end\)"),
        ("negative_prompt", 3, r"NAG negative prompt \(negative_prompt\) must be text"),
        ("hires_mode", "sometimes", r"NAG hires \(hires_mode\) must be one of Both passes, First pass only, Hires pass only"),
    ],
)
def test_wrong_values_name_the_field_and_range(field, value, message):
    with pytest.raises(NagParamError, match=message):
        NagParams(enabled=True, **{field: value})
    if value is not None:  # a missing value on an enabled NAG takes the default (below)
        with pytest.raises(NagParamError, match=message):
            nag.from_dict({"enabled": True, field: value})


def test_enabled_must_be_a_boolean_in_the_model():
    for value in ("true", 1, None):
        with pytest.raises(NagParamError, match=rf"NAG enabled \(enabled\) must be true or false, got {value!r}"):
            NagParams(enabled=value)


GARBAGE = {"scale": "high", "tau": None, "alpha": math.nan, "start": 2, "end": -1, "negative_prompt": 3, "hires_mode": "x", "zz": 1}


@pytest.mark.parametrize("enabled", [False, None, "true", "yes", 1, 0, 2.5, [], {}])
def test_anything_but_enabled_true_reads_as_off_and_reads_nothing_else(enabled):
    """A host fills left-out arguments from UI defaults (None for an empty Gradio 4 textbox), and
    another extension's misaligned arguments can land in NAG's slots: none of it may fail a job."""
    assert nag.from_dict({"enabled": enabled, **GARBAGE}) == DEFAULTS
    assert nag.from_args([enabled, *GARBAGE.values()]) == DEFAULTS  # a longer list than NAG's 8
    assert nag.from_args([{"enabled": enabled, **GARBAGE}]) == DEFAULTS
    assert nag.from_args([enabled]) == DEFAULTS
    noted = nag.ignored_enabled([], {"enabled": enabled})
    assert bool(noted) == (enabled is not None and not isinstance(enabled, bool))
    if noted:
        assert noted.startswith(f"off: NAG enabled (enabled) is {enabled!r}, not true or false")


def test_nothing_and_none_everywhere_read_as_off():
    assert nag.from_args([]) == DEFAULTS
    assert nag.from_args([None] * 8) == DEFAULTS
    assert nag.from_dict({}) == DEFAULTS


@pytest.mark.parametrize("position", range(1, 9))
def test_a_missing_value_on_an_enabled_nag_takes_the_default(position):
    args = [True, 7.0, 3.0, 0.5, 0.1, 0.9, "glasses", "First pass only", 0.75]
    args[position] = None
    name = nag.ARG_ORDER[position]
    expected = NagParams(**{**dict(zip(nag.ARG_ORDER, args, strict=True)), name: getattr(DEFAULTS, name)})
    assert nag.from_args(args) == expected
    assert nag.from_args([dict(zip(nag.ARG_ORDER, args, strict=True))]) == expected
    assert nag.from_args([{"enabled": True, name: None}]) == NagParams(enabled=True)


def test_overrides_come_after_the_arguments():
    assert nag.from_args([False, 9.0], {"enabled": True}) == NagParams(enabled=True, scale=9.0)
    assert nag.from_args([True, "bad"], {"enabled": False}) == DEFAULTS
    with pytest.raises(NagParamError, match=r"\(scale\)"):
        nag.from_args([False, "bad"], {"enabled": True})


def test_start_must_be_below_end():
    with pytest.raises(NagParamError, match=r"NAG start \(start\) must be below NAG end \(end\), got start 0.5 and end 0.5"):
        NagParams(start=0.5, end=0.5)
    assert NagParams(start=0.0, end=0.01).end == 0.01


def test_integers_are_accepted_and_stored_as_floats():  # JSON and Gradio 4 sliders give ints
    params = nag.from_dict({"enabled": True, "scale": 5, "tau": 2, "alpha": 0, "end": 1})
    assert params.scale == 5.0 and isinstance(params.scale, float) and isinstance(params.alpha, float)


def test_hires_mode_is_matched_case_insensitively():
    assert NagParams(hires_mode="hires pass only").hires_mode == "Hires pass only"


@pytest.mark.parametrize(
    "mode,first,hires",
    [("Both passes", True, True), ("First pass only", True, False), ("Hires pass only", False, True)],
)
def test_hires_mode_picks_passes(mode, first, hires):
    params = NagParams(enabled=True, hires_mode=mode)
    assert (params.guides_pass(False), params.guides_pass(True)) == (first, hires)
    assert not NagParams(enabled=False, hires_mode=mode).guides_pass(False)


SAMPLE = NagParams(True, 7.5, 3.0, 0.125, 0.1, 0.6, 'blurry, lowres: "bad"\nhands', HIRES_MODES[1], 0.75)


def test_argument_list_round_trip():
    assert nag.to_args(SAMPLE) == [True, 7.5, 3.0, 0.125, 0.1, 0.6, 'blurry, lowres: "bad"\nhands', "First pass only", 0.75]
    assert nag.from_args(nag.to_args(SAMPLE)) == SAMPLE
    assert nag.from_args([True, 6]) == NagParams(enabled=True, scale=6.0)
    assert nag.from_args([]) == DEFAULTS


def test_argument_list_too_long_is_rejected_when_enabled():
    with pytest.raises(NagParamError, match="at most 9 arguments"):
        nag.from_args([*nag.to_args(SAMPLE), "extra"])
    assert nag.from_args([False, *nag.to_args(SAMPLE)[1:], "extra"]) == DEFAULTS


def test_dict_round_trip_and_single_dict_argument():
    assert nag.from_dict(nag.to_dict(SAMPLE)) == SAMPLE
    ui_defaults = nag.to_args(DEFAULTS)[1:]  # the host fills the rest with UI defaults
    params = nag.from_args([{"enabled": True, "scale": 5, "negative_prompt": "glasses"}, *ui_defaults])
    assert params == NagParams(enabled=True, scale=5.0, negative_prompt="glasses")


def test_unknown_dict_keys_are_rejected_when_enabled():
    with pytest.raises(NagParamError, match=r"unknown NAG argument\(s\) sclae, z; known: enabled, scale"):
        nag.from_dict({"enabled": True, "sclae": 5, "z": 1})


def test_overrides_are_validated():
    assert DEFAULTS.with_overrides({"scale": 9}).scale == 9.0
    with pytest.raises(NagParamError, match=r"\(tau\)"):
        DEFAULTS.with_overrides({"tau": 0})


def host_round_trip(entries):
    """Write entries as the host's create_infotext does, read them as parse_generation_parameters does."""
    from modules import infotext_utils  # the A1111 stand-in (tests/a1111)

    line = ", ".join(f"{key}: {infotext_utils.quote(value)}" for key, value in entries.items())
    return infotext_utils.parse_generation_parameters(f"a cat\nNegative prompt: ugly\nSteps: 20, {line}")


def test_infotext_writes_every_field_and_round_trips_through_the_host_format():
    entries = nag.to_infotext(SAMPLE)
    assert entries == {
        "NAG scale": 7.5,
        "NAG tau": 3.0,
        "NAG alpha": 0.125,
        "NAG start": 0.1,
        "NAG end": 0.6,
        "NAG negative prompt": 'blurry, lowres: "bad"\nhands',
        "NAG hires": "First pass only",
        "NAG sigma end": 0.75,
    }
    assert nag.from_infotext(host_round_trip(entries)) == SAMPLE
    plain = NagParams(enabled=True)
    assert nag.to_infotext(plain)["NAG negative prompt"] == '""'  # the host's reader drops empty values
    assert "NAG sigma end" not in nag.to_infotext(plain)  # unset: the infotext NAG wrote before it existed
    assert nag.from_infotext(host_round_trip(nag.to_infotext(plain))) == plain
    assert nag.from_infotext({"NAG scale": "5.0", "NAG tau": "2.5"}) == plain  # missing keys: defaults


def test_infotext_without_nag_keys_turns_nag_off():
    assert nag.from_infotext({"Steps": "20", "CFG scale": "7"}) == DEFAULTS
    assert not nag.from_infotext({}).enabled


def test_bad_infotext_value_names_the_field():
    with pytest.raises(NagParamError, match=r"NAG tau \(tau\) must be a number, got 'abc'"):
        nag.from_infotext({"NAG scale": "5", "NAG tau": "abc"})


def test_presets_are_valid_and_documented():
    names = [preset.name for preset in PRESETS]
    assert len(set(names)) == len(names)
    for family in ("SD1.x", "SDXL, 20+ steps with CFG", "Few-step / CFG 1 (Turbo, Lightning, DMD2, LCM)", "Paper (SDXL)"):
        assert family in nag.PRESETS_BY_NAME
    for preset in PRESETS:
        applied = preset.apply(SAMPLE)
        numbers = (applied.scale, applied.tau, applied.alpha, applied.start, applied.end, applied.sigma_end)
        assert numbers == (preset.scale, preset.tau, preset.alpha, 0.0, preset.end, preset.sigma_end)
        assert applied.negative_prompt == SAMPLE.negative_prompt
        assert len(preset.source) > 20
    for flow in ("Flux-dev / Flux-schnell (CFG 1)", "Flux Kontext", "Chroma", "SD3.5 Turbo (CFG 1)", "Wan fast (few steps, CFG 1)"):
        assert (nag.PRESETS_BY_NAME[flow].end, nag.PRESETS_BY_NAME[flow].sigma_end) == (1.0, 0.75)  # the authors' nag_sigma_end
    assert nag.PRESETS_BY_NAME["SD1.x"].sigma_end == 4.0
    paper = nag.PRESETS_BY_NAME["Paper (SDXL)"]
    assert (paper.scale, paper.tau, paper.alpha) == (3.0, 2.5, 0.5)  # paper phi 2 is scale 3


def test_argument_lists_and_infotexts_from_before_the_sigma_end_keep_their_meaning():
    before = [True, 7.0, 3.0, 0.5, 0.1, 0.9, "glasses", "First pass only"]  # the 8 arguments NAG took before
    assert nag.from_args(before) == NagParams(*before, sigma_end=0.0)
    assert nag.from_args([True, *before[1:], 0.75]).sigma_end == 0.75
    assert nag.from_args([{"enabled": True, "sigma_end": 4}]).sigma_end == 4.0
    old_image = {"NAG scale": "7.0", "NAG tau": "3.0", "NAG end": "0.9"}
    assert nag.from_infotext(old_image).sigma_end == 0.0
    pasted = nag.paste_key("sigma_end")
    assert pasted(old_image) == 0.0 and pasted({**old_image, "NAG sigma end": "0.75"}) == "0.75"
    assert pasted({"Steps": "20"}) is None  # no NAG in the pasted parameters: the control stays as it is
    with pytest.raises(NagParamError, match=r"NAG sigma end \(sigma_end\) must be a finite number from 0 to 20, got 25"):
        nag.from_args([True, *before[1:], 25])
