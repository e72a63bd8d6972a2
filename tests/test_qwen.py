"""NAG on Qwen-Image and Qwen-Image-Edit through lib_nag.models.qwen, on a tiny stand-in of Forge Neo's
backend/nn/qwen.py (tests/forge/backend/nn/qwen.py), against the float64 reference written from the
authors' dual-stream pattern (tests/reference_qwen.py). Edit's reference latents come, as in Neo, through
the global ``dynamic_args["ref_latents"]`` with batch 1."""

from types import SimpleNamespace

import pytest
import torch
from backend.args import dynamic_args
from backend.nn.qwen import QwenImageTransformer2DModel, QwenImageTransformerBlock
from modules import prompt_parser, shared
from reference_qwen import reference_qwen
from test_flux import (
    EACH_LAYOUT,
    EACH_NEGATIVE_LENGTH,
    ENDINGS,
    assert_guided_as_expected,
    flux_sd_model,
    new_pass,
    relative,
    run_a_job_to_its_end,
    sample_in_and_after_the_window,
)
from test_forge import forge_model, sd_model_of
from test_mmdit import tiny_model as tiny_mmdit
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models import qwen
from lib_nag.models.flux import FluxPass
from lib_nag.models.mmdit import ForgeMMDiTPass
from lib_nag.models.qwen import NOT_RUN, STOOD_ASIDE, QwenImagePass, nag_forward
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.params import NagParams
from lib_nag.webui.conditioning import NegativeConditioning
from lib_nag.webui.forge_patcher import forge_rows
from lib_nag.webui.report import JobReport, PassReport

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
NAG = (PARAMS.scale, PARAMS.tau, PARAMS.alpha)
IMAGES, CONTEXT, PROMPT_TOKENS, CHANNELS = 2, 24, 7, 4
SIZES = {"in_channels": 4 * CHANNELS, "out_channels": CHANNELS, "num_layers": 3, "attention_head_dim": 16, "num_attention_heads": 4}
REFERENCES = {"no reference": [], "one reference": [(4, 6)], "two references": [(6, 4), (3, 5)]}  # latent sizes
EACH_REFERENCES = pytest.mark.parametrize("sizes", REFERENCES.values(), ids=REFERENCES.keys())


def tiny_model(model_class=QwenImageTransformer2DModel):
    """Random weights larger than the default init, so every block changes its input visibly."""
    model = model_class(**SIZES, joint_attention_dim=CONTEXT, axes_dims_rope=(4, 6, 6))
    for parameter in model.parameters():
        parameter.copy_(torch.randn_like(parameter) * 0.3)
    return model.eval()


def batch(chunks, negative_tokens=5, images=IMAGES):
    """A call's arguments for ``chunks`` (cond_or_uncond) of ``images`` 5×6 latents (odd: padded), as
    Neo's KModel makes it (σ per row, ``sigmas`` one per image), and a NAG negative per image."""
    rows, sigmas = images * len(chunks), torch.rand(images)
    arguments = {
        "x": torch.randn(rows, CHANNELS, 1, 5, 6),
        "timesteps": sigmas.repeat(len(chunks)),
        "context": torch.randn(rows, PROMPT_TOKENS, CONTEXT),
        "transformer_options": {"cond_or_uncond": chunks, "sigmas": sigmas},
    }
    return arguments, torch.randn(images, negative_tokens, CONTEXT)


@pytest.fixture
def references():
    """Sets Neo's ``dynamic_args["ref_latents"]``: batch-1 latents of the given sizes, as the engine encodes them."""

    def set_references(sizes):
        dynamic_args["ref_latents"] = [torch.randn(1, CHANNELS, 1, *size) for size in sizes]
        return dynamic_args["ref_latents"]

    yield set_references
    dynamic_args.pop("ref_latents", None)


def cond_rows(chunks, images=IMAGES):
    return [c * images + j for c, label in enumerate(chunks) if label == 0 for j in range(images)]


def guided(model, negative, arguments, params=PARAMS, is_active=lambda options: True, calls=None):
    """The model called with NAG's forward in place of its own (then removed)."""
    on_call = None if calls is None else lambda guided, why: calls.append((guided, why))
    model.forward = nag_forward(model, lambda: negative, params, forge_rows(is_active, on_call), on_call)
    try:
        return model(**arguments)
    finally:
        del model.forward


def stock(model, arguments):
    """The model's own output. Neo does not expand its batch-1 references to the call's rows (it fails on
    several rows); here they are expanded for the call, as NAG's run does."""
    refs = dynamic_args.get("ref_latents") or []
    dynamic_args["ref_latents"] = [ref.expand(len(arguments["x"]), -1, -1, -1, -1) for ref in refs]
    try:
        return model(**arguments)
    finally:
        dynamic_args["ref_latents"] = refs


def reference(model, arguments, negative, images=IMAGES):
    """The reference on the call's rows reordered so that the cond rows come last (ComfyUI's layout)."""
    cond = cond_rows(arguments["transformer_options"]["cond_or_uncond"], images)
    order = [r for r in range(len(arguments["x"])) if r not in cond] + cond
    rows = (arguments[name][order] for name in ("x", "timesteps", "context"))
    out = reference_qwen(model, *rows, negative[[r % images for r in cond]], NAG, dynamic_args.get("ref_latents") or ())
    return out[torch.tensor(order).argsort()]


@EACH_REFERENCES
@EACH_NEGATIVE_LENGTH
@EACH_LAYOUT
def test_matches_the_authors_pattern_and_leaves_other_rows_alone(chunks, negative_tokens, sizes, references, record_difference):
    model = tiny_model()
    arguments, negative = batch(chunks, negative_tokens)
    references(sizes)
    calls = []
    out = guided(model, negative, arguments, calls=calls)
    assert_guided_as_expected(out, stock(model, arguments), reference(model, arguments, negative), cond_rows(chunks), record_difference)
    assert calls == [(True, "")]


@pytest.mark.parametrize("sizes", [REFERENCES["one reference"], REFERENCES["two references"]], ids=["one reference", "two references"])
def test_an_edit_call_of_one_row_as_neo_runs_it(sizes, references, record_difference):
    """CFG 1, one image: Neo's own batch-1 references fit the call as they are."""
    model = tiny_model()
    arguments, negative = batch([0], images=1)
    refs = references(sizes)
    out = guided(model, negative, arguments)
    difference = relative(out, reference(model, arguments, negative, images=1))
    record_difference(difference)
    assert difference <= 1e-5
    assert dynamic_args["ref_latents"] is refs and all(ref.shape[0] == 1 for ref in refs)  # NAG changed nothing global
    dynamic_args["ref_latents"] = []
    assert relative(guided(model, negative, arguments), out) > 1e-3  # the references took part


def test_the_reference_tokens_go_through_the_blocks_and_the_host_cuts_them(references, monkeypatch):
    model = tiny_model()
    arguments, negative = batch([1, 0])
    references(REFERENCES["two references"])
    tokens = []
    block = qwen._GuidedCall.block

    def recorded(self, module, args, original):
        tokens.append(args["img"].shape[1])
        return block(self, module, args, original)

    monkeypatch.setattr(qwen._GuidedCall, "block", recorded)
    out = guided(model, negative, arguments)
    image_tokens, reference_tokens = 3 * 3, 3 * 2 + 2 * 3
    assert tokens == [image_tokens + reference_tokens] * SIZES["num_layers"]
    assert out.shape == arguments["x"].shape


@EACH_REFERENCES
def test_scale_one_or_a_nag_negative_equal_to_the_prompt_changes_nothing(sizes, references, record_difference):
    model = tiny_model()
    chunks = [1, 0]
    arguments, negative = batch(chunks)
    references(sizes)
    own = stock(model, arguments)
    scale_one = guided(model, negative, arguments, NagParams(enabled=True, scale=1.0))
    record_difference(relative(scale_one, own), "scale 1")
    assert relative(scale_one, own) <= 1e-6
    same_prompt = guided(model, arguments["context"][cond_rows(chunks)], arguments)
    record_difference(relative(same_prompt, own), "NAG negative = prompt")
    assert relative(same_prompt, own) <= 1e-5


@pytest.mark.parametrize("sizes", [REFERENCES["no reference"], REFERENCES["one reference"]], ids=["no reference", "one reference"])
def test_an_images_output_does_not_depend_on_its_place_in_the_batch(sizes, references, record_difference):
    model = tiny_model()
    arguments, negative = batch([1, 0])
    references(sizes)
    out = guided(model, negative, arguments)
    swap = [1, 0, 3, 2]  # the two images change places in both chunks
    swapped = {name: arguments[name][swap] for name in ("x", "timesteps", "context")}
    options = {"cond_or_uncond": [1, 0], "sigmas": arguments["transformer_options"]["sigmas"][[1, 0]]}
    out_swapped = guided(model, negative[[1, 0]], swapped | {"transformer_options": options})
    record_difference(relative(out_swapped[swap], out))
    assert relative(out_swapped[swap], out) <= 1e-6


def test_without_a_cond_chunk_or_outside_the_window_the_model_runs_its_own_forward(references):
    model = tiny_model()
    refs = references(REFERENCES["one reference"])
    calls = []
    arguments, negative = batch([1], images=1)
    assert torch.equal(guided(model, negative, arguments, calls=calls), model(**arguments))
    arguments, negative = batch([1, 0])
    with pytest.raises(RuntimeError, match="Sizes of tensors must match"):  # Neo's own forward, batch-1 references on 4 rows
        guided(model, negative, arguments, is_active=lambda options: False)
    dynamic_args["ref_latents"] = [ref.expand(len(arguments["x"]), -1, -1, -1, -1) for ref in refs]
    outside = guided(model, negative, arguments, is_active=lambda options: False, calls=calls)
    assert torch.equal(outside, model(**arguments))
    assert calls == []


def host_only_inputs(rows):
    """What NAG leaves to the model's own forward."""
    return {
        "ControlNet": {"control": {"input": [torch.randn(rows, 9, 64)]}},
        "attention mask": {"attention_mask": torch.ones(rows, PROMPT_TOKENS)},
        "dit replace patch": {"patches_replace": {"dit": {("double_block", 1): lambda args, extra: extra["original_block"](args)}}},
        "double_block patch": {"patches": {"double_block": [lambda out: out]}},
    }


@pytest.mark.parametrize("extra", ["ControlNet", "attention mask", "dit replace patch", "double_block patch"])
def test_a_call_with_what_nag_leaves_to_the_model_gets_the_models_forward(extra):
    model = tiny_model()
    arguments, negative = batch([1, 0])
    inputs = host_only_inputs(len(arguments["x"]))[extra]
    if extra.endswith("patch"):
        arguments["transformer_options"] |= inputs
    else:
        arguments |= inputs
    calls = []
    assert torch.equal(guided(model, negative, arguments, calls=calls), model(**arguments))
    assert calls == [(False, STOOD_ASIDE)]  # counted, and the console says why


class IgnoresBlockPatches(QwenImageTransformer2DModel):
    """A build whose forward does not read ``dit`` replace patches."""

    def forward(
        self, x, timesteps, context, attention_mask=None, guidance=None, ref_latents=None, transformer_options={}, control=None, **kwargs  # noqa: B006
    ):
        options = {key: value for key, value in transformer_options.items() if key != "patches_replace"}
        return super().forward(x, timesteps, context, ref_latents=ref_latents, transformer_options=options)


def test_a_forward_that_skips_nags_block_patches_is_counted_not_guided():
    model = tiny_model(IgnoresBlockPatches)
    arguments, negative = batch([1, 0])
    calls = []
    assert torch.equal(guided(model, negative, arguments, calls=calls), model(**arguments))
    assert calls == [(False, NOT_RUN)]


# --- the pass: Forge Neo's engine, patcher, object patch and step window ------------------------------


def qwen_sd_model(model=None):
    """What Neo's sd_model holds for a Qwen-Image checkpoint: the patcher over a KModel."""
    return sd_model_of(model or tiny_model())


def test_the_pass_patches_a_clone_and_guides_inside_the_window(references):
    references(REFERENCES["one reference"])
    shared.sd_model = qwen_sd_model()
    original = shared.sd_model.forge_objects.unet
    model = original.model.diffusion_model
    arguments, negative = batch([1, 0])
    own = stock(model, arguments)
    assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), shared.sd_model) is QwenImagePass
    nag_pass = new_pass(QwenImagePass, negative, NagParams(enabled=True, end=0.5))
    patcher = shared.sd_model.forge_objects.unet
    assert patcher is not original and not original.object_patches and "forward" not in vars(model)
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(dynamic_args, "ref_latents", [ref.expand(len(arguments["x"]), -1, -1, -1, -1) for ref in dynamic_args["ref_latents"]])
        first = sample_in_and_after_the_window(
            nag_pass, patcher, lambda: model(**arguments), lambda: guided(model, negative, arguments), own
        )
    assert torch.equal(first[:IMAGES], own[:IMAGES]) and not torch.equal(first, own)
    assert shared.sd_model.forge_objects.unet is original
    line = JobReport(model="QwenImage", passes={False: nag_pass.report}).line()
    assert line == "[NAG] active on QwenImage: first pass 1/10 steps guided (1 model calls), 3 double-stream blocks"


class FakeQwenEngine(SimpleNamespace):
    """Neo's ``QwenImage.get_learned_conditioning`` (engine l.46-72) around a random text encoder: a
    positive prompt takes the img2img latent (once) and the reference images, sets the reference latents
    and uses the Edit template, or, with no image, clears the reference latents; a negative prompt is
    text only, with the text-to-image template."""

    def __init__(self, model):
        super().__init__(forge_objects=qwen_sd_model(model).forge_objects, ref_latents=[], ini_latent=None)

    def get_learned_conditioning(self, prompt):
        if not prompt.is_negative_prompt:
            images = [*self.ref_latents]
            if self.ini_latent is not None:
                images.insert(0, self.ini_latent)
                self.ini_latent = None
            if images:
                dynamic_args["ref_latents"] = [torch.randn(1, CHANNELS, 1, 4, 6) for _ in images]
                return self.encode(prompt, template_tokens=9 + 3 * len(images))
            dynamic_args["ref_latents"].clear()
        return self.encode(prompt, template_tokens=5)

    @staticmethod
    def encode(prompt, template_tokens):
        return torch.stack([torch.full((len(text.split()) + template_tokens, CONTEXT), float(template_tokens)) for text in prompt])


@pytest.mark.parametrize("as_negative", [True, False], ids=["as a negative prompt", "as a positive prompt"])
def test_the_nag_negative_is_encoded_as_a_negative_prompt_and_leaves_the_references_alone(as_negative, references, monkeypatch):
    refs = references(REFERENCES["one reference"])
    engine = shared.sd_model = FakeQwenEngine(tiny_model())
    engine.ini_latent = img2img = torch.randn(1, 8, 8, 3)
    monkeypatch.setattr(QwenImagePass, "encodes_as_negative_prompt", as_negative)  # False: what NAG must not do
    p = SimpleNamespace(
        negative_prompts=["", ""], sampler_name="Euler", steps=10, width=64, height=64, extra_network_data={},
        get_conds_with_caching=lambda function, prompts, steps, _caches, _networks, hires: function(shared.sd_model, prompts, steps, hires),
    )  # fmt: skip
    job = SimpleNamespace(p=p, params=NagParams(enabled=True, negative_prompt="blurry hands"), negative=NegativeConditioning())
    nag_pass = QwenImagePass(job, PassReport(is_hires=False))
    nag_pass.close()
    kept = dynamic_args["ref_latents"] is refs and len(refs) == 1 and engine.ini_latent is img2img
    negative = nag_pass.schedules[0][0].cond
    assert kept == as_negative
    assert (negative.shape == (2 + 5, CONTEXT) and torch.all(negative == 5)) == as_negative  # the text-to-image template


@ENDINGS
def test_nothing_is_left_after_any_qwen_job(ending):
    arguments, negative = batch([0])
    schedules = [[prompt_parser.ScheduledPromptConditioning(3, n)] for n in negative]
    run_a_job_to_its_end(qwen_sd_model(), QwenImagePass, schedules, arguments, ending)


# --- recognition ------------------------------------------------------------------------------------


class NunchakuQwenImageTransformerBlock(QwenImageTransformerBlock):
    """Neo's SVDQ block (backend/nn/svdq.py): another block body over quantized layers."""


class NunchakuQwenImageTransformer2DModel(QwenImageTransformer2DModel):
    def __init__(self, **sizes):
        super().__init__(**sizes)
        heads, head_dim = sizes["num_attention_heads"], sizes["attention_head_dim"]
        blocks = [NunchakuQwenImageTransformerBlock(self.inner_dim, heads, head_dim) for _ in self.transformer_blocks]
        self.transformer_blocks = torch.nn.ModuleList(blocks)


def test_a_switch_between_sdxl_and_qwen_image_picks_each_models_pass():
    host = ForgeHost.__new__(ForgeHost)
    sdxl, qwen_image = forge_model(randomize_outputs(sd1_like_unet(context_dim=1280))), qwen_sd_model()
    assert [host.pass_for(m) for m in (sdxl, qwen_image, sdxl)] == [ForgeUNetPass, QwenImagePass, ForgeUNetPass]


def test_the_registry_gives_qwen_image_its_models_only():
    host = ForgeHost.__new__(ForgeHost)
    mmdit = SimpleNamespace(forge_objects=qwen_sd_model(tiny_mmdit("forge sd3.5 large")).forge_objects)
    assert host.pass_for(flux_sd_model("neo")) is FluxPass and host.pass_for(mmdit) is ForgeMMDiTPass
    assert not qwen.is_qwen_image(flux_sd_model("neo").forge_objects.unet.model.diffusion_model)
    assert qwen.unsupported_qwen_image(flux_sd_model("neo").forge_objects.unet.model.diffusion_model) == ""


def test_an_svdq_qwen_image_is_named_not_run():
    sd_model = qwen_sd_model(NunchakuQwenImageTransformer2DModel(**SIZES, joint_attention_dim=CONTEXT, axes_dims_rope=(4, 6, 6)))
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(sd_model) is None
    assert host.unsupported_reason(sd_model) == (
        "NAG runs Forge Neo's own Qwen-Image model; NunchakuQwenImageTransformer2DModel (SVDQ/Nunchaku or another build)"
        " has other blocks, not supported yet"
    )
