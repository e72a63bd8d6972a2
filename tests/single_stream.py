"""Checks shared by the tests of Forge Neo's single-stream families (Z-Image and Lumina 2, ERNIE-Image,
Krea 2): a family's
test module describes its tiny model, a call's arguments and its reference in a ``Case``, and runs these
checks on it."""

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from modules import shared
from test_flux import NAG, PARAMS, assert_guided_as_expected, new_pass, relative, sample_in_and_after_the_window
from test_forge import sd_model_of

from lib_nag.hosts.forge import ForgeHost
from lib_nag.params import NagParams
from lib_nag.webui.forge_patcher import forge_rows
from lib_nag.webui.report import JobReport

IMAGES = 2
PER_ROW = ("x", "timesteps", "context")  # the arguments with one row per row of the call


@dataclass(frozen=True)
class Case:
    """A family under test: ``tiny_model()``; ``batch(chunks, negative_tokens)`` → (the call's keyword
    arguments, the NAG negative with one row per image); ``nag_forward`` (the family's builder);
    ``reference(model, x, timesteps, context, cond_rows, nag_context, nag, **options)``."""

    tiny_model: Callable[[], torch.nn.Module]
    batch: Callable[..., tuple[dict[str, Any], torch.Tensor]]
    nag_forward: Callable[..., Any]
    reference: Callable[..., torch.Tensor]

    def guided(self, model, negative, arguments, params=PARAMS, is_active=lambda options: True, calls=None):
        """The model called with NAG's forward as its instance ``forward`` (removed after)."""
        on_call = None if calls is None else lambda guided, why: calls.append((guided, why))
        model.forward = self.nag_forward(model, lambda: negative, params, forge_rows(is_active, on_call), on_call)
        try:
            return model(**arguments)
        finally:
            del model.forward

    def expected(self, model, arguments, negative, nag=NAG, **options):
        cond = cond_rows(arguments["transformer_options"]["cond_or_uncond"])
        rows = [arguments[name] for name in PER_ROW]
        return self.reference(model, *rows, cond, negative[[r % IMAGES for r in cond]], nag, **options)


def cond_rows(chunks):
    return [c * IMAGES + j for c, label in enumerate(chunks) if label == 0 for j in range(IMAGES)]


def check_guided_as_the_reference(case, chunks, negative_tokens, record_difference, arguments=None, negative=None, **options):
    """Guided rows within 1e-5 of the reference, the other rows the model's own, bit for bit."""
    model = case.tiny_model()
    if arguments is None:
        arguments, negative = case.batch(chunks, negative_tokens)
    calls = []
    out = case.guided(model, negative, arguments, calls=calls)
    assert_guided_as_expected(
        out, model(**arguments), case.expected(model, arguments, negative, **options), cond_rows(chunks), record_difference
    )
    assert calls == [(True, "")]


def check_text_alone_equals_the_full_nag_stream(case, chunks, negative_tokens, record_difference):
    """The modulation carries no text: NAG's rows as their text alone give what full NAG rows give,
    computed alike in float32 (the reference's full stream)."""
    model = case.tiny_model()
    arguments, negative = case.batch(chunks, negative_tokens)
    difference = relative(case.guided(model, negative, arguments), case.expected(model, arguments, negative, dtype=torch.float32))
    record_difference(difference)
    assert difference <= 1e-6


def check_the_model_runs_its_own_forward_without_a_cond_chunk_or_outside_the_window(case):
    model = case.tiny_model()
    arguments, negative = case.batch([1])
    calls = []
    assert torch.equal(case.guided(model, negative, arguments, calls=calls), model(**arguments))
    arguments, negative = case.batch([1, 0])
    assert torch.equal(case.guided(model, negative, arguments, is_active=lambda options: False, calls=calls), model(**arguments))
    assert calls == []


def check_a_nag_negative_equal_to_the_prompt_changes_nothing(case, record_difference):
    model = case.tiny_model()
    arguments, _ = case.batch([0])
    difference = relative(case.guided(model, arguments["context"][:IMAGES], arguments), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-5


def check_scale_one_changes_nothing(case, record_difference):
    model = case.tiny_model()
    arguments, negative = case.batch([1, 0])
    difference = relative(case.guided(model, negative, arguments, NagParams(enabled=True, scale=1.0)), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-6


def check_an_images_output_does_not_depend_on_its_place_in_the_batch(case, record_difference):
    model = case.tiny_model()
    arguments, negative = case.batch([1, 0])
    out = case.guided(model, negative, arguments)
    swap = [1, 0, 3, 2]  # the two images trade places in both chunks
    swapped = arguments | {name: arguments[name][swap] for name in PER_ROW}
    options = arguments["transformer_options"]
    swapped["transformer_options"] = options | {"sigmas": options["sigmas"][[1, 0]]}
    difference = relative(case.guided(model, negative[[1, 0]], swapped)[swap], out)
    record_difference(difference)
    assert difference <= 1e-6


def check_what_the_model_ignores_nag_ignores_alike(case, extra):
    """Call arguments the model reads not (``extra``: a ControlNet, a patch, a mask): NAG has nothing to
    stand aside from, and ignores them as the model does."""
    model = case.tiny_model()
    arguments, negative = case.batch([1, 0])
    extra = extra | {"transformer_options": arguments["transformer_options"] | extra.get("transformer_options", {})}
    assert torch.equal(model(**arguments | extra), model(**arguments))
    assert torch.equal(case.guided(model, negative, arguments | extra), case.guided(model, negative, arguments))


# --- the pass: Forge's patcher, object patch, step window ---------------------------------------------


def check_the_pass_guides_a_clone_inside_the_window(case, pass_class, hooked):
    """The family's pass patches a clone of the patcher, guides step 0 (the uncond rows the model's own)
    and not step 5 (end 0.5 of 10), writes its console line and sets everything back."""
    model = case.tiny_model()
    arguments, negative = case.batch([1, 0])
    shared.sd_model = sd_model = sd_model_of(model)
    original = sd_model.forge_objects.unet
    stock = model(**arguments)
    assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), sd_model) is pass_class
    nag_pass = new_pass(pass_class, negative, NagParams(enabled=True, end=0.5))
    patcher = sd_model.forge_objects.unet
    assert patcher is not original and not original.object_patches and "forward" not in vars(model)
    guided = partial(case.guided, model, negative, arguments)
    first = sample_in_and_after_the_window(nag_pass, patcher, lambda: model(**arguments), guided, stock)
    assert torch.equal(first[:IMAGES], stock[:IMAGES])
    assert sd_model.forge_objects.unet is original
    assert nag_pass.report.guided == {0} and nag_pass.report.guided_calls == 1
    name = type(model).__name__
    line = JobReport(model=name, passes={False: nag_pass.report}).line()
    assert line == f"[NAG] active on {name}: first pass 1/10 steps guided (1 model calls), {hooked}"
