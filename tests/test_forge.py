"""The Forge-family replace path on real ldm modules, driven the way Forge's transformer block
and sampling function drive it (tests/forge stands in for Forge's backend; Forge's ``modules``
package is A1111's, stood in by tests/a1111)."""

from types import SimpleNamespace

import pytest
import torch
from backend.attention import attention_function
from backend.patcher.unet import UnetPatcher
from forge_block import forge_attn2, run_unet_as_forge
from modules import prompt_parser, script_callbacks, shared
from unets import randomize_outputs, sd1_like_unet

from lib_nag.attention import NegativeKV, PositiveRows, nag_cross_attention
from lib_nag.hosts import forge
from lib_nag.hosts.forge import ForgeHost, ForgePass, positive_chunks, replace_key
from lib_nag.hosts.webui import PassReport
from lib_nag.params import NagParams

PARAMS = NagParams(enabled=True, scale=5.0, tau=2.5, alpha=0.25)
IMAGES = 2


def forge_model(unet):
    return SimpleNamespace(forge_objects=SimpleNamespace(unet=UnetPatcher(SimpleNamespace(diffusion_model=unet))), is_sd1=True)


def negative_schedules(width=768, tokens=154):
    """One NAG negative per image, switching at step 2 (a ``[a:b:2]`` schedule)."""
    return [
        [
            prompt_parser.ScheduledPromptConditioning(2, torch.randn(tokens, width)),
            prompt_parser.ScheduledPromptConditioning(10, torch.randn(tokens, width)),
        ]
        for _ in range(IMAGES)
    ]


@pytest.fixture
def forge_pass():
    """A ForgePass on a tiny SD1-like UNet, with the job parts it reads."""
    shared.sd_model = forge_model(randomize_outputs(sd1_like_unet()))
    schedules = negative_schedules()
    job = SimpleNamespace(p=object(), params=PARAMS, negative=SimpleNamespace(encode=lambda p, params, is_hires: schedules))
    nag_pass = ForgePass(job, PassReport(is_hires=False))
    yield nag_pass
    nag_pass.close()
    assert not script_callbacks.callback_map["callbacks_cfg_denoiser"]


def denoiser_step(nag_pass, step, total=10):
    """What Forge's CFGDenoiser hands the callback: un-expanded x, its p, step and total_steps."""
    denoiser = SimpleNamespace(p=nag_pass.job.p, step=step, total_steps=total, sampler=SimpleNamespace(config=None))
    params = script_callbacks.CFGDenoiserParams(torch.randn(IMAGES, 4, 8, 8), None, torch.ones(IMAGES), step, total, None, None, denoiser)
    script_callbacks.cfg_denoiser_callback(params)


def test_keys_and_chunks():
    assert replace_key("input_blocks.4.1.transformer_blocks.0.attn2") == ("input", 4, 0)
    assert replace_key("middle_block.1.transformer_blocks.3.attn2") == ("middle", 0, 3)
    assert replace_key("output_blocks.11.1.transformer_blocks.9.attn2") == ("output", 11, 9)
    assert replace_key("input_blocks.4.1.attn2") is None
    rows = positive_chunks([1, 0, 0], 6, "cpu")
    assert rows.rows.tolist() == [2, 3, 4, 5] and rows.negative_index.tolist() == [0, 1, 0, 1]
    assert positive_chunks([1], 2, "cpu") is None


def test_hook_clones_the_patcher_and_registers_every_block(forge_pass):
    patcher = shared.sd_model.forge_objects.unet
    replaces = patcher.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert forge_pass.patched[0][2] is not patcher and not forge_pass.patched[0][2].model_options["transformer_options"]
    unet = forge_pass.patched[0][2].model.diffusion_model
    assert sorted(replaces) == sorted(replace_key(n) for n, _ in unet.named_modules() if n.endswith(".attn2"))
    assert forge_pass.report.layers == 7
    original = forge_pass.patched[0][2]
    forge_pass.close()
    assert shared.sd_model.forge_objects.unet is original


@pytest.mark.parametrize("cond_or_uncond", [[1, 0], [0, 1], [0], [1], [0, 0, 1], [1, 0, 0]])
def test_replace_guides_exactly_the_cond_chunks_like_the_a1111_path(forge_pass, cond_or_uncond, record_difference):
    denoiser_step(forge_pass, 0)
    patcher = shared.sd_model.forge_objects.unet
    name, module = next((n, m) for n, m in patcher.model.diffusion_model.named_modules() if n.endswith(".attn2"))
    key = replace_key(name)
    rows = len(cond_or_uncond) * IMAGES
    x, context = torch.randn(rows, 64, module.to_q.in_features), torch.randn(rows, 77, 768)
    options = {**patcher.model_options["transformer_options"], "cond_or_uncond": cond_or_uncond, "sigmas": torch.full((IMAGES,), 7.0)}
    out = forge_attn2(module, x, context, options, key[:2], key[2])

    stock_z = attention_function(module.to_q(x), module.to_k(context), module.to_v(context), module.heads)
    stock = module.to_out(stock_z)
    positive = positive_chunks(cond_or_uncond, rows, "cpu")
    guided_rows = set() if positive is None else set(positive.rows.tolist())
    for row in range(rows):
        if row not in guided_rows:
            assert torch.equal(out[row], stock[row])  # uncond chunks: the host's attention, bit for bit
    if positive is not None:
        a1111 = nag_cross_attention(module, x, context, positive, forge_pass.negative, NegativeKV(), PARAMS)
        difference = (out[positive.rows] - a1111[positive.rows]).abs().max().item()
        record_difference(difference, str(cond_or_uncond))
        assert difference <= 1e-5
        assert (out[positive.rows] - stock[positive.rows]).abs().max() > 1e-3


def test_separate_chunks_and_the_step_window(forge_pass):
    patcher = shared.sd_model.forge_objects.unet
    x = torch.randn(IMAGES, 4, 8, 8)
    timesteps, context = torch.full((IMAGES,), 500), torch.randn(IMAGES, 77, 768)
    stock = patcher.model.diffusion_model(x, timesteps, context=context)
    denoiser_step(forge_pass, 0)
    uncond_call = run_unet_as_forge(patcher, x, timesteps, context, {"cond_or_uncond": [1], "sigmas": torch.ones(IMAGES)})
    cond_call = run_unet_as_forge(patcher, x, timesteps, context, {"cond_or_uncond": [0], "sigmas": torch.ones(IMAGES)})
    torch.testing.assert_close(uncond_call, stock, atol=1e-6, rtol=0)  # SDPA vs ldm's einsum: not bitwise
    assert (cond_call - stock).abs().max() > 1e-3

    first_negative = forge_pass.negative
    denoiser_step(forge_pass, 3)  # the [a:b:2] schedule moved on
    assert forge_pass.negative is not first_negative
    assert torch.equal(forge_pass.negative[1], forge_pass.schedules[1][1].cond)
    second = run_unet_as_forge(patcher, x, timesteps, context, {"cond_or_uncond": [0], "sigmas": torch.ones(IMAGES)})
    assert not torch.equal(second, cond_call)

    forge_pass.params = NagParams(enabled=True, end=0.5)
    denoiser_step(forge_pass, 5)  # past the end: the replaces pass through
    after_end = run_unet_as_forge(patcher, x, timesteps, context, {"cond_or_uncond": [0], "sigmas": torch.ones(IMAGES)})
    torch.testing.assert_close(after_end, stock, atol=1e-6, rtol=0)
    assert forge_pass.report.guided == {0, 3}


@pytest.mark.parametrize("key_size", [2, 3])
def test_chains_to_a_replace_already_registered(key_size):
    """IP-Adapter registers 2-tuple keys on SD1.5 and 3-tuple keys on SDXL; NAG's Z⁺ is its output."""
    unet = randomize_outputs(sd1_like_unet())
    model = forge_model(unet)
    calls = []

    def ip_adapter(q, k, v, extra_options):
        calls.append(extra_options["block"])
        return attention_function(q, k, v, extra_options["n_heads"]) * 1.5

    for name, _ in unet.named_modules():
        key = replace_key(name) if name.endswith(".attn2") else None
        if key:
            model.forge_objects.unet.set_model_attn2_replace(ip_adapter, *key[:key_size])
    shared.sd_model = model
    schedules = negative_schedules()
    job = SimpleNamespace(p=object(), params=PARAMS, negative=SimpleNamespace(encode=lambda p, params, is_hires: schedules))
    nag_pass = ForgePass(job, PassReport(is_hires=False))
    try:
        denoiser_step(nag_pass, 0)
        name, module = next((n, m) for n, m in unet.named_modules() if n.endswith(".attn2"))
        key = replace_key(name)
        x, context = torch.randn(2 * IMAGES, 64, module.to_q.in_features), torch.randn(2 * IMAGES, 77, 768)
        options = {**model.forge_objects.unet.model_options["transformer_options"], "cond_or_uncond": [1, 0]}
        out = forge_attn2(module, x, context, options, key[:2], key[2])
        q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
        chained = module.to_out(ip_adapter(q, k, v, {"n_heads": module.heads, "block": key[:2]}))
        assert torch.equal(out[:IMAGES], chained[:IMAGES])  # uncond chunk: IP-Adapter's output
        assert calls and (out[IMAGES:] - chained[IMAGES:]).abs().max() > 1e-3
    finally:
        nag_pass.close()


def test_idempotent_when_the_unet_already_carries_nag(forge_pass):
    """Forge Classic without a LoRA starts the hires pass from the UNet the first pass patched."""
    patcher = shared.sd_model.forge_objects.unet
    first = patcher.model_options["transformer_options"]["patches_replace"]["attn2"]
    second_pass = ForgePass(forge_pass.job, PassReport(is_hires=True))  # patches the patched UNet
    try:
        again = shared.sd_model.forge_objects.unet.model_options["transformer_options"]["patches_replace"]["attn2"]
        assert set(again) == set(first)
        assert all(getattr(replace, forge.PREVIOUS) is None for replace in again.values())
    finally:
        second_pass.close()
    assert shared.sd_model.forge_objects.unet is patcher


def test_refiner_switch_patches_the_new_model(forge_pass):
    refiner = forge_model(randomize_outputs(sd1_like_unet(context_dim=1280)))
    forge_pass.job.negative.encode = lambda p, params, is_hires: negative_schedules(width=1280)
    shared.sd_model = refiner
    denoiser_step(forge_pass, 1)
    replaces = refiner.forge_objects.unet.model_options["transformer_options"]["patches_replace"]["attn2"]
    assert len(replaces) == 7 and forge_pass.negative.shape[-1] == 1280
    x, timesteps, context = torch.randn(IMAGES, 4, 8, 8), torch.full((IMAGES,), 500), torch.randn(IMAGES, 77, 1280)
    run_unet_as_forge(refiner.forge_objects.unet, x, timesteps, context, {"cond_or_uncond": [0]})


def test_unsupported_models_are_named():
    flux_like = SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2))  # a DiT: no attn2 anywhere
    flux_like = SimpleNamespace(forge_objects=SimpleNamespace(unet=SimpleNamespace(model=flux_like)))
    assert ForgeHost.unsupported_reason(ForgeHost.__new__(ForgeHost), flux_like) == "SimpleNamespace has no cross-attention (attn2) layers"


def test_kv_is_computed_at_sampling_time_from_current_weights(forge_pass):
    denoiser_step(forge_pass, 0)
    patcher = shared.sd_model.forge_objects.unet
    name, module = next((n, m) for n, m in patcher.model.diffusion_model.named_modules() if n.endswith(".attn2"))
    key = replace_key(name)
    x, context = torch.randn(IMAGES, 64, module.to_q.in_features), torch.randn(IMAGES, 77, 768)
    options = {**patcher.model_options["transformer_options"], "cond_or_uncond": [0]}
    before = forge_attn2(module, x, context, options, key[:2], key[2])
    module.to_v.weight.mul_(2.0)  # a LoRA patched in after the replace was registered
    after = forge_attn2(module, x, context, options, key[:2], key[2])
    expected = nag_cross_attention(module, x, context, PositiveRows.of([0, 1], [0, 1], "cpu"), forge_pass.negative, NegativeKV(), PARAMS)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)
    assert not torch.equal(before, after)
