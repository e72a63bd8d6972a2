"""NAG on Forge Neo's Flux.1 with Kontext reference latents (tests/forge/backend/nn/flux_neo.py): the
references' tokens are image-stream tokens, as in the authors' NAGFlux (guided, their q/k/v reused by
the NAG rows), and Neo's forward drops them at the end (``out[:, :img_tokens]``), not NAG. The issue
text says "never guided, never dropped"; the authors' code guides them, and this follows the code.
Neo's Flux.1 and Chroma (tests/forge/backend/nn/chroma_neo.py) leave to the host the calls NAG's run
of the blocks would change, and Neo's model variants that NAG does not run are named. NAG encodes its
negative as a negative prompt, so Neo's Flux engine (tests/forge/backend/diffusion_engine/flux_neo.py)
keeps the Kontext references the host's prompt set."""

from types import SimpleNamespace

import pytest
import torch
from backend.args import dynamic_args
from backend.diffusion_engine.flux_neo import Flux
from modules import processing, prompt_parser, shared
from test_flux import IMAGES, PARAMS, POOLED, T5, batch, flux_sd_model, guided, reference, relative, sd_model_of, tiny_model

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models.flux import STOOD_ASIDE, FluxPass, nag_forward
from lib_nag.params import NagParams
from lib_nag.webui.conditioning import NegativeConditioning
from lib_nag.webui.report import PassReport

REFERENCES = {"one reference": [(4, 6)], "two references": [(6, 4), (3, 5)]}  # latent sizes: the second is offset


@pytest.fixture
def kontext():
    """Sets Neo's ``dynamic_args["ref_latents"]``: one latent per row of the call for each size."""

    def references(rows, sizes):
        dynamic_args["ref_latents"] = [torch.randn(rows, 4, *size) for size in sizes]
        return dynamic_args["ref_latents"]

    yield references
    dynamic_args.pop("ref_latents", None)


@pytest.mark.parametrize("sizes", REFERENCES.values(), ids=REFERENCES.keys())
@pytest.mark.parametrize("chunks", [[0], [1, 0]], ids=["cond only", "uncond, cond"])
def test_kontext_matches_the_authors_formulation_and_leaves_uncond_rows_alone(chunks, sizes, kontext, record_difference):
    model = tiny_model("neo")
    arguments, negative = batch("neo", chunks)
    refs = kontext(len(arguments["x"]), sizes)
    calls = []
    out = guided(model, negative, arguments, calls=calls)
    stock = model(**arguments)

    expected = reference(model, "neo", arguments, negative, refs)
    record_difference(relative(out, expected))
    assert relative(out, expected) <= 1e-5
    uncond = list(range(IMAGES)) if chunks == [1, 0] else []
    cond = [r for r in range(len(out)) if r not in uncond]
    assert torch.equal(out[uncond], stock[uncond])
    assert relative(out[cond], stock[cond]) > 1e-3
    assert calls == [(True, "")]
    dynamic_args["ref_latents"] = None
    assert relative(guided(model, negative, arguments), out) > 1e-3  # the references took part


def test_the_reference_tokens_go_through_the_blocks_and_the_host_drops_them(kontext):
    model = tiny_model("neo")
    arguments, negative = batch("neo", [1, 0])
    kontext(len(arguments["x"]), REFERENCES["two references"])
    nag = nag_forward(model, lambda: negative, PARAMS, lambda options: True)
    tokens = []

    def recorded(*args, **kwargs):
        out = nag(*args, **kwargs)
        tokens.append(out.shape[1])
        return out

    model.forward_orig = recorded
    out = model(**arguments)
    del model.forward_orig
    image_tokens, reference_tokens = 3 * 3, 3 * 2 + 2 * 3
    assert tokens == [image_tokens + reference_tokens]  # NAG kept them to the end; Neo's forward cut them
    assert out.shape == arguments["x"].shape and torch.equal(out, guided(model, negative, arguments))


def test_kontext_with_scale_one_changes_nothing(kontext, record_difference):
    model = tiny_model("neo")
    arguments, negative = batch("neo", [1, 0])
    kontext(len(arguments["x"]), REFERENCES["one reference"])
    difference = relative(guided(model, negative, arguments, NagParams(enabled=True, scale=1.0)), model(**arguments))
    record_difference(difference)
    assert difference <= 1e-6


def host_only_inputs(arguments):
    """Inputs Neo's forward_orig runs and NAG's blocks do not (the stand-in ignores ``dit`` patches)."""
    rows, hidden = len(arguments["x"]), tiny_model("neo").hidden_size
    options = arguments["transformer_options"]
    return {
        "ControlNet": {"control": {"input": [torch.randn(rows, 9, hidden)], "output": [None]}},
        "attention mask": {"attention_mask": torch.zeros(rows, 1, 1, 1)},
        "post_input patch": {"transformer_options": options | {"patches": {"post_input": [lambda tokens: tokens]}}},
        "dit replace patch": {"transformer_options": options | {"patches_replace": {"dit": {("double_block", 0): None}}}},
    }


@pytest.mark.parametrize("extra", ["ControlNet", "attention mask", "post_input patch", "dit replace patch"])
@pytest.mark.parametrize("kind", ["neo", "neo-chroma"])
def test_a_call_with_what_only_the_host_runs_gets_the_hosts_forward_orig(kind, extra):
    model = tiny_model(kind)
    arguments, negative = batch(kind, [1, 0])
    arguments |= host_only_inputs(arguments)[extra]
    calls = []
    assert torch.equal(guided(model, negative, arguments, calls=calls), model(**arguments))
    assert calls == [(False, STOOD_ASIDE)]  # counted, and the console says why


@pytest.mark.parametrize("skipped", ["skip_mmdit", "skip_dit"])
def test_neo_chroma_with_skipped_blocks_is_named_not_run(skipped):
    sd_model = flux_sd_model("neo-chroma")
    host = ForgeHost.__new__(ForgeHost)
    assert host.pass_for(sd_model) is FluxPass
    setattr(sd_model.forge_objects.unet.model.diffusion_model, skipped, [0])  # Neo's forward_orig would leave block 0 out
    assert host.pass_for(sd_model) is None
    assert "IntegratedChromaTransformer2DModel is another one" in host.unsupported_reason(sd_model)


def test_a_neo_build_without_the_flux2_attributes_is_still_recognised():
    """Newer Neo builds dropped ``flipped_img_txt`` (and may lack the Flux.2 MLP switches)."""
    sd_model = flux_sd_model("neo")
    for block in sd_model.forge_objects.unet.model.diffusion_model.double_blocks:
        del block.flipped_img_txt
    assert ForgeHost.pass_for(ForgeHost.__new__(ForgeHost), sd_model) is FluxPass


def check_the_nag_negative_keeps_the_references(pass_class, model, engine, references):
    """A ``pass_class`` pass on ``model``, whose prompts ``engine`` encodes, started as in Neo: the host
    encodes the job's prompts before sampling (``setup_conds``: the positive one consumes the img2img
    latent), NAG its negative when its pass starts, through the host's prompt pipeline. The references
    (``dynamic_args["ref_latents"]``) stay the img2img latent and the stored ones, as the prompt set them."""
    init, *stored = references
    engine.ini_latent, engine.ref_latents = init, stored
    shared.sd_model = sd_model_of(model)
    shared.sd_model.get_learned_conditioning, shared.sd_model.sd_checkpoint_info = engine.get_learned_conditioning, None
    engine.get_learned_conditioning(prompt_parser.SdConditioning(["a cat"]))
    p = processing.StableDiffusionProcessingTxt2Img(prompt="a cat", negative_prompt="blurry", steps=10, sampler_name="Euler")
    p.negative_prompts, p.extra_network_data = ["blurry"], {}
    nag_pass = pass_class(SimpleNamespace(p=p, params=PARAMS, negative=NegativeConditioning()), PassReport(is_hires=False))
    try:
        assert nag_pass.hooked
        assert [id(ref) for ref in dynamic_args["ref_latents"]] == [id(ref) for ref in references]
    finally:
        nag_pass.close()


def test_the_nag_negative_leaves_kontexts_references_as_the_prompt_set_them(neo_dynamic_args):
    """Neo's Flux engine sets the Kontext references again for every prompt that is not a negative one,
    from its stored references and the img2img image's latent, which the host's prompt has consumed:
    encoded as a positive, the NAG negative would take the img2img image out of the references."""
    engine = Flux(lambda texts: (torch.randn(len(texts), 5, T5), torch.randn(len(texts), POOLED)))
    neo_dynamic_args["kontext"] = True
    references = [torch.randn(1, 4, 4, 6), torch.randn(1, 4, 6, 4)]  # the img2img image, a stitched one
    check_the_nag_negative_keeps_the_references(FluxPass, tiny_model("neo"), engine, references)
