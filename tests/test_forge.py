"""The Forge-family path on real ldm modules, driven the way Forge's transformer block and sampling
function drive it (tests/forge stands in for Forge's backend; Forge's ``modules`` package is A1111's,
stood in by tests/a1111)."""

from types import SimpleNamespace

import pytest
import torch
from backend.attention import attention_function
from backend.patcher.unet import UnetPatcher
from forge_block import block_key, run_unet_as_forge
from ldm.modules.attention import BasicTransformerBlock
from modules import prompt_parser, script_callbacks, shared
from reference import reference_guided_rows
from unets import randomize_outputs, sd1_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models import unet
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.params import NagParams
from lib_nag.webui.forge_patcher import place, positive_chunks
from lib_nag.webui.report import PassReport

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
IMAGES = 2


def sd_model_of(model, **engine):
    """What Forge's sd_model holds for a checkpoint of ``model`` (and ``engine``'s attributes): the patcher over a KModel."""
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(SimpleNamespace(diffusion_model=model))), **engine)


def forge_model(unet):
    return sd_model_of(unet, is_sd1=True)


def negative_schedules(width=768, tokens=154):
    """One NAG negative per image, switching at step 2 (a ``[a:b:2]`` schedule)."""
    return [
        [
            prompt_parser.ScheduledPromptConditioning(2, torch.randn(tokens, width)),
            prompt_parser.ScheduledPromptConditioning(10, torch.randn(tokens, width)),
        ]
        for _ in range(IMAGES)
    ]


def new_pass(params=PARAMS, is_hires=False, schedules=None):
    schedules = schedules or negative_schedules()
    job = SimpleNamespace(p=object(), params=params, negative=SimpleNamespace(encode=lambda *_arguments: schedules))
    return ForgeUNetPass(job, PassReport(is_hires=is_hires))


def all_hooks_gone(unet):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in unet.modules())


@pytest.fixture
def forge_pass():
    """A ForgeUNetPass on a tiny SD1-like UNet, with the job parts it reads."""
    shared.sd_model = forge_model(randomize_outputs(sd1_like_unet()))
    unet = shared.sd_model.forge_objects.unet.model.diffusion_model
    nag_pass = new_pass()
    yield nag_pass
    nag_pass.close()
    assert not script_callbacks.callback_map["callbacks_cfg_denoiser"]
    assert all_hooks_gone(unet)


def denoiser_step(nag_pass, step, total=10, sigma=1.0):
    """What Forge's CFGDenoiser hands the callback: un-expanded x, σ per image, its p, step and total_steps."""
    denoiser = SimpleNamespace(p=nag_pass.job.p, step=step, total_steps=total, sampler=SimpleNamespace(config=None))
    sigmas = torch.full((IMAGES,), sigma)
    params = script_callbacks.CFGDenoiserParams(torch.randn(IMAGES, 4, 8, 8), None, sigmas, step, total, None, None, denoiser)
    script_callbacks.cfg_denoiser_callback(params)


def unet_call(cond_or_uncond, context=None, patcher=None):
    """One UNet call with ``len(cond_or_uncond)`` chunks of IMAGES rows (the same latents in each)."""
    patcher = patcher or shared.sd_model.forge_objects.unet
    rows = len(cond_or_uncond) * IMAGES
    torch.manual_seed(1)
    x = torch.randn(IMAGES, 4, 8, 8).repeat(len(cond_or_uncond), 1, 1, 1)
    context = torch.randn(rows, 77, 768) if context is None else context
    options = {"cond_or_uncond": cond_or_uncond, "sigmas": torch.ones(IMAGES)}
    return run_unet_as_forge(patcher, x, torch.full((rows,), 500), context, options), x, context


def test_chunks_and_placement():
    rows = positive_chunks([1, 0, 0], 6, "cpu")
    assert rows.rows.tolist() == [2, 3, 4, 5] and rows.negative_index.tolist() == [0, 1, 0, 1]
    assert positive_chunks([1], 2, "cpu") is None
    options = {"cond_or_uncond": [1, 0, 0], "sigmas": torch.ones(2)}
    context = torch.randn(6, 77, 8)
    assert place(torch.zeros(6, 4, 8), context, options) == (True, 1)
    assert place(torch.zeros(7, 4, 8), torch.cat([context, context[:1]]), options) == (False, 0)  # a pad row
    assert place(torch.zeros(12, 4, 8), context.repeat(2, 1, 1), options) == (True, 2)  # tiles: copies of the batch
    regrouped = torch.cat([context[:2], context[2:].repeat(2, 1, 1)])  # cond chunks expanded per region
    assert place(torch.zeros(10, 4, 8), regrouped, options) == (False, 0)


def test_hook_clones_the_patcher_with_one_attn2_patch_and_hooks_every_attn2(forge_pass):
    patcher = shared.sd_model.forge_objects.unet
    original = forge_pass.patched[0][2]
    assert patcher is not original and not original.model_options["transformer_options"]
    assert [getattr(p, unet.NAG_PATCH) for p in patcher.model_options["transformer_options"]["patches"]["attn2_patch"]] == [True]
    attn2 = [m for n, m in patcher.model.diffusion_model.named_modules() if n.endswith(".attn2")]
    assert len(attn2) == forge_pass.report.layers == 7
    assert all(m.to_q._forward_hooks and m.to_out[0]._forward_pre_hooks for m in attn2)
    forge_pass.close()
    assert shared.sd_model.forge_objects.unet is original


def first_attn2_capture(patcher):
    """The UNet's first attn2, and what a call of it received and returned (``seen``); call
    ``seen["stop"]()`` to stop recording."""
    module = next(m for n, m in patcher.model.diffusion_model.named_modules() if n.endswith(".attn2"))
    seen = {}

    def before(_module, args, kwargs):
        seen.setdefault("x", args[0] if args else kwargs["x"])

    def after(_module, _args, out):
        seen.setdefault("out", out)

    handles = [module.register_forward_pre_hook(before, with_kwargs=True), module.register_forward_hook(after)]
    return module, seen, lambda: [h.remove() for h in handles]


@pytest.mark.parametrize("cond_or_uncond", [[1, 0], [0, 1], [0], [1], [0, 0, 1], [1, 0, 0]])
def test_exactly_the_cond_chunks_are_guided(forge_pass, cond_or_uncond, record_difference):
    denoiser_step(forge_pass, 0)
    module, seen, stop = first_attn2_capture(shared.sd_model.forge_objects.unet)
    _out, _x, context = unet_call(cond_or_uncond)
    stop()
    x, out = seen["x"], seen["out"]
    stock = module.to_out(attention_function(module.to_q(x), module.to_k(context), module.to_v(context), module.heads))
    positive = positive_chunks(cond_or_uncond, x.shape[0], "cpu")
    guided_rows = set() if positive is None else set(positive.rows.tolist())
    for row in range(x.shape[0]):
        if row not in guided_rows:
            assert torch.equal(out[row], stock[row])  # uncond chunks: the host's attention, bit for bit
    if positive is not None:
        negatives = [forge_pass.negative[i : i + 1] for i in positive.negative_index.tolist()]
        expected = reference_guided_rows(module, x, context, positive.rows.tolist(), negatives, 5.0, 2.5, 0.25)
        difference = (out[positive.rows] - expected).abs().max().item()
        record_difference(difference, str(cond_or_uncond))
        assert difference <= 1e-5
        assert (out[positive.rows] - stock[positive.rows]).abs().max() > 1e-3


def test_separate_chunks_the_step_window_and_the_schedule(forge_pass):
    unet = shared.sd_model.forge_objects.unet.model.diffusion_model
    stock, x, context = unet_call([0])
    stock = unet(x, torch.full((IMAGES,), 500), context=context)
    denoiser_step(forge_pass, 0)
    uncond_call, *_ = unet_call([1], context)
    cond_call, *_ = unet_call([0], context)
    torch.testing.assert_close(uncond_call, stock, atol=1e-6, rtol=0)  # SDPA vs ldm's einsum: not bitwise
    assert (cond_call - stock).abs().max() > 1e-3

    first_negative = forge_pass.negative
    denoiser_step(forge_pass, 3)  # the [a:b:2] schedule moved on
    assert forge_pass.negative is not first_negative
    assert torch.equal(forge_pass.negative[1], forge_pass.schedules[1][1].cond)
    second, *_ = unet_call([0], context)
    assert not torch.equal(second, cond_call)

    forge_pass.params = NagParams(enabled=True, end=0.5)
    denoiser_step(forge_pass, 5)  # past the end: the hooks are gone
    assert all_hooks_gone(unet)
    after_end, *_ = unet_call([0], context)
    torch.testing.assert_close(after_end, stock, atol=1e-6, rtol=0)
    forge_pass.close()
    assert forge_pass.report.guided == {0, 3} and forge_pass.report.guided_calls == 14


@pytest.mark.parametrize("key_size", [2, 3])
def test_composes_with_an_attn2_replace(key_size):
    """Forge's IP-Adapter registers attn2 replaces (2-tuple keys on SD1.5, 3-tuple on SDXL): the block
    then never calls attn2's forward, yet NAG's Z⁺ is the replace's output."""
    unet = randomize_outputs(sd1_like_unet())
    shared.sd_model = forge_model(unet)
    calls = []

    def ip_adapter(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return attention_function(q, k, v, extra_options["n_heads"]) * 1.5

    for name, block in unet.named_modules():
        if isinstance(block, BasicTransformerBlock):
            (block_name, number), index = block_key(name)
            shared.sd_model.forge_objects.unet.set_model_attn2_replace(ip_adapter, *(block_name, number, index)[:key_size])
    nag_pass = new_pass()
    try:
        denoiser_step(nag_pass, 0)
        _module, seen, stop = first_attn2_capture(shared.sd_model.forge_objects.unet)
        unet_call([1, 0])
        stop()
        assert calls and not seen  # the replace ran; attn2 itself was never called
        assert nag_pass.nag.guided_calls == 7
    finally:
        nag_pass.close()
    assert all_hooks_gone(unet)
    with_ip, _x, context = unet_call([1, 0])
    nag_pass = new_pass(params=NagParams(enabled=True, scale=1.0))
    try:
        denoiser_step(nag_pass, 0)
        at_scale_1, *_ = unet_call([1, 0], context)
    finally:
        nag_pass.close()
    assert torch.equal(at_scale_1, with_ip)  # scale 1: IP-Adapter's output untouched


def test_tiles_of_the_batch_are_guided_like_the_batch(forge_pass, record_difference):
    """Forge's integrated MultiDiffusion wraps apply_model and calls it on tile-major copies of the
    batch (``torch.cat`` of crops, the conds ``repeat``-ed), with the options of the whole batch."""
    denoiser_step(forge_pass, 0)
    patcher = shared.sd_model.forge_objects.unet
    torch.manual_seed(3)
    tiles = [torch.randn(IMAGES, 4, 8, 8).repeat(2, 1, 1, 1) for _ in range(3)]
    context = torch.randn(2 * IMAGES, 77, 768)
    options = {"cond_or_uncond": [1, 0], "sigmas": torch.ones(IMAGES)}
    timesteps = torch.full((2 * IMAGES,), 500)
    each = [run_unet_as_forge(patcher, tile, timesteps, context, options) for tile in tiles]
    together = run_unet_as_forge(patcher, torch.cat(tiles), timesteps.repeat(3), context.repeat(3, 1, 1), options)
    difference = (together - torch.cat(each)).abs().max().item()
    record_difference(difference)
    assert difference <= 1e-5
    assert forge_pass.report.unplaced == 0 and forge_pass.nag.guided_calls == 4 * 7


def test_a_unet_that_already_carries_nag_gets_one_nag_patch(forge_pass):
    """Forge Classic without a LoRA starts the hires pass from the UNet the first pass patched."""
    patcher = shared.sd_model.forge_objects.unet
    second_pass = new_pass(is_hires=True)
    try:
        patches = shared.sd_model.forge_objects.unet.model_options["transformer_options"]["patches"]["attn2_patch"]
        assert len(patches) == 1 and patches[0] is not patcher.model_options["transformer_options"]["patches"]["attn2_patch"][0]
    finally:
        second_pass.close()
    assert shared.sd_model.forge_objects.unet is patcher


def test_refiner_switch_patches_the_new_model(forge_pass):
    refiner = forge_model(randomize_outputs(sd1_like_unet(context_dim=1280)))
    forge_pass.job.negative.encode = lambda p, params, is_hires, as_negative_prompt: negative_schedules(width=1280)
    shared.sd_model = refiner
    denoiser_step(forge_pass, 1)
    assert forge_pass.negative.shape[-1] == 1280
    assert len(refiner.forge_objects.unet.model_options["transformer_options"]["patches"]["attn2_patch"]) == 1
    unet_call([0], torch.randn(IMAGES, 77, 1280), patcher=refiner.forge_objects.unet)
    assert forge_pass.nag.guided_calls == 7


def test_a_fast_refiner_loading_weights_in_place_reprojects_the_nag_negative(monkeypatch):
    """Forge Neo's fast refiner (``refiner_fast_sd``) loads the refiner's weights into the same modules,
    built in inference mode, so no pointer or version counter changes; Neo then keeps the first
    checkpoint's name in ``sd_samplers_common.ORIGINAL_CHECKPOINT``. NAG moves to the new weights, and
    at the end of the pass the patcher NAG found is put back."""
    from modules import sd_samplers_common

    schedules = negative_schedules()
    context = torch.randn(2 * IMAGES, 77, 768)
    with torch.inference_mode():
        base, refiner = randomize_outputs(sd1_like_unet()), randomize_outputs(sd1_like_unet())
        outputs = {}
        for seen in (False, True):
            base_weights = {name: tensor.clone() for name, tensor in base.state_dict().items()}
            shared.sd_model = forge_model(base)
            original = shared.sd_model.forge_objects.unet
            nag_pass = new_pass(schedules=schedules)
            denoiser_step(nag_pass, 0)
            unet_call([1, 0], context)
            base.load_state_dict(refiner.state_dict())
            monkeypatch.setattr(sd_samplers_common, "ORIGINAL_CHECKPOINT", "base.safetensors" if seen else None, raising=False)
            denoiser_step(nag_pass, 1)
            outputs[seen] = unet_call([1, 0], context)[0]
            nag_pass.close()
            assert shared.sd_model.forge_objects.unet is original and all_hooks_gone(base)
            monkeypatch.setattr(sd_samplers_common, "ORIGINAL_CHECKPOINT", None)
            fresh = new_pass(schedules=schedules)  # a pass that starts on the refiner's weights
            denoiser_step(fresh, 1)
            expected = unet_call([1, 0], context)[0]
            fresh.close()
            base.load_state_dict(base_weights)
    assert torch.equal(outputs[True], expected)
    assert not torch.equal(outputs[False], expected)  # the K⁻/V⁻ of the first weights, kept


class SelfAttention(torch.nn.Module):
    """Shaped like Forge's mmditx.SelfAttention (dfdcbab6): fused qkv, proj."""

    def __init__(self):
        super().__init__()
        self.qkv, self.proj = torch.nn.Linear(8, 24), torch.nn.Linear(8, 8)


def test_unsupported_models_are_named():
    flux_like = SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))  # a DiT: no attn2 anywhere
    flux_like = SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=flux_like)))
    host = ForgeHost.__new__(ForgeHost)
    assert host.unsupported_reason(flux_like) == "NAG does not know the attention layers of SimpleNamespace (Linear)"
    # SD3.5 Medium (MMDiT-X) names a self-attention of its x_blocks attn2: not a cross-attention
    x_block = torch.nn.Module()
    x_block.attn2 = SelfAttention()
    mmditx = torch.nn.ModuleDict({"joint_blocks": torch.nn.ModuleList([torch.nn.ModuleDict({"x_block": x_block})])})
    sd35 = SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=SimpleNamespace(diffusion_model=mmditx))), is_sd3=True)
    assert host.unsupported_reason(sd35) == "NAG does not know the attention layers of SD3 (ModuleDict)"


def test_kv_is_computed_at_sampling_time_from_current_weights(forge_pass):
    denoiser_step(forge_pass, 0)
    before, _x, context = unet_call([0])
    module = next(m for n, m in shared.sd_model.forge_objects.unet.model.diffusion_model.named_modules() if n.endswith(".attn2"))
    module.to_v.weight.mul_(2.0)  # a LoRA patched in after the pass started
    k_before = forge_pass.kv.get(module, forge_pass.negative, like=context)[1]
    torch.testing.assert_close(k_before, module.to_v(forge_pass.negative))
    after, *_ = unet_call([0], context)
    assert not torch.equal(before, after)


def couple_attn2_patch(n, context, value, extra_options):
    """Shaped like Forge Couple's attn2_patch (Haoming02/sd-forge-couple ``7a396d8d``,
    ``lib_couple/attention_couple.py``): an uncond chunk keeps its rows; a cond chunk is repeated once
    per region (two here), the prompt's context stacked with a region's."""
    labels = extra_options["cond_or_uncond"]
    per_chunk = n.shape[0] // len(labels)
    rows, contexts = [], []
    for i, label in enumerate(labels):
        chunk, chunk_context = n[i * per_chunk : (i + 1) * per_chunk], context[i * per_chunk : (i + 1) * per_chunk]
        rows.append(chunk if label else chunk.repeat(2, 1, 1))
        contexts.append(chunk_context if label else torch.cat([chunk_context, chunk_context.flip(1)]))
    return torch.cat(rows), torch.cat(contexts), torch.cat(contexts)


def attn2_step_merging_regions(block, x, context, transformer_options):
    """The attn2 step, then the regions merged back (Forge Couple's attn2_output_patch), for [1, 0]."""
    out = _real_attn2_step(block, x, context, transformer_options)
    if out.shape[0] == x.shape[0]:
        return out
    uncond, regions = out[:IMAGES], out[IMAGES:]
    return torch.cat([uncond, (regions[:IMAGES] + regions[IMAGES:]) / 2])


@pytest.mark.parametrize("order", ["before NAG", "after NAG"])
def test_rows_regrouped_by_another_patch_are_not_guided_and_are_counted(order):
    shared.sd_model = forge_model(randomize_outputs(sd1_like_unet()))
    patcher = shared.sd_model.forge_objects.unet
    if order == "before NAG":
        patcher.set_model_attn2_patch(couple_attn2_patch)
    nag_pass = new_pass()
    if order == "after NAG":
        shared.sd_model.forge_objects.unet.set_model_attn2_patch(couple_attn2_patch)
    try:
        denoiser_step(nag_pass, 0)
        with pytest.MonkeyPatch.context() as m:
            m.setattr(forge_block_module(), "attn2_step", attn2_step_merging_regions)
            unet_call([1, 0])
    finally:
        nag_pass.close()
    assert nag_pass.report.guided_calls == 0 and nag_pass.report.unplaced == 7 and nag_pass.report.placed == 0


def forge_block_module():
    import forge_block

    return forge_block


_real_attn2_step = forge_block_module().attn2_step


def test_a_pass_that_fails_to_hook_leaves_the_patcher_as_it_was(monkeypatch):
    from lib_nag.attention import CrossAttentionNag

    shared.sd_model = forge_model(randomize_outputs(sd1_like_unet()))
    original = shared.sd_model.forge_objects.unet

    def broken(self, modules):
        raise RuntimeError("odd attn2")

    monkeypatch.setattr(CrossAttentionNag, "install", broken)
    with pytest.raises(RuntimeError, match="odd attn2"):
        new_pass()
    assert shared.sd_model.forge_objects.unet is original
    assert not script_callbacks.callback_map["callbacks_cfg_denoiser"]


def flow_sigmas(steps, shift, scheduler):
    """A flow model's σ per step in float32: Simple (uniform in t) or Karras (ρ 7 between the table's ends),
    through the discrete-flow shift ``shift·t / (1 + (shift − 1)·t)``."""
    shifted = lambda t: shift * t / (1 + (shift - 1) * t)  # noqa: E731
    if scheduler == "simple":
        return shifted(torch.linspace(1, 0, steps + 1)[:-1])
    high, low = shifted(torch.tensor(1.0)) ** (1 / 7), shifted(torch.tensor(1e-3)) ** (1 / 7)
    return (high + torch.linspace(0, 1, steps) * (low - high)) ** 7


@pytest.mark.parametrize("scheduler", ["simple", "karras"])
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [4, 9])
def test_sigma_end_ends_the_window_at_the_first_step_below_it(forge_pass, scheduler, shift, steps):
    forge_pass.params = NagParams(enabled=True, sigma_end=0.75)
    sigmas = flow_sigmas(steps, shift, scheduler).tolist()
    active = []
    for step, sigma in enumerate(sigmas):
        denoiser_step(forge_pass, step, steps, sigma)
        active.append(forge_pass.active)
    first_below = next(i for i, sigma in enumerate(sigmas) if sigma < 0.75)
    assert active == [i < first_below for i in range(steps)]
    assert not forge_pass.hooked  # unhooked from the first step below the σ end
    assert forge_pass.report.sigma_stop == f"σ {sigmas[first_below]:.4g} below NAG sigma end 0.75 from step {first_below + 1}"


def test_a_sigma_equal_to_the_sigma_end_is_still_guided(forge_pass):
    """Flux-schnell's Simple schedule at shift 1 has σ 0.75 exactly at its second of 4 steps; the authors'
    ``>=`` guides it."""
    forge_pass.params = NagParams(enabled=True, sigma_end=0.75)
    for step, sigma in enumerate(flow_sigmas(4, 1.0, "simple").tolist()):
        denoiser_step(forge_pass, step, 4, sigma)
        assert forge_pass.active == (step < 2)
