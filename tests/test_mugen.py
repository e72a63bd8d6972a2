"""Mugen on Forge Neo (``backend/diffusion_engine/mugen.py`` and huggingface_guess ``model_list.Mugen``, read
in exo101/sd-webui-forge-neo-v3 @ 5692d2d1): an SDXL UNet (``IntegratedUNet2DConditionModel``, 32 latent
channels) trained as a flow model, with SDXL's CLIP-L + CLIP-G context. NAG runs it on the UNet path,
unchanged: every ``attn2`` hooked, rows from the ``attn2_patch``. The engine sets ``is_sdxl`` ("WebUI
Legacy"), so the console calls it SDXL."""

from types import SimpleNamespace

import torch
from backend.attention import attention_function
from backend.patcher.unet import UnetPatcher
from forge_block import run_unet_as_forge
from modules import shared
from reference import reference_guided_rows
from test_forge import IMAGES, PARAMS, denoiser_step, first_attn2_capture, negative_schedules
from unets import SDXL_ADM_CHANNELS, randomize_outputs, sdxl_like_unet

from lib_nag.hosts.forge import ForgeHost
from lib_nag.models.unet import ForgeUNetPass
from lib_nag.webui.forge_patcher import positive_chunks
from lib_nag.webui.job import NagHost, NagJob


class Mugen(SimpleNamespace):
    """Neo's engine class for Mugen checkpoints: ``is_sdxl`` and ``use_shift`` set."""


def test_mugen_runs_on_the_unet_path(capsys, record_difference):
    unet = randomize_outputs(sdxl_like_unet(latent_channels=32))
    shared.sd_model = Mugen(
        forge_objects=SimpleNamespace(unet=UnetPatcher(SimpleNamespace(diffusion_model=unet))), is_sdxl=True, use_shift=True
    )
    host = ForgeHost.__new__(ForgeHost)
    NagHost.__init__(host)
    assert host.pass_for(shared.sd_model) is ForgeUNetPass
    schedules = negative_schedules(width=2048)
    host.negative = SimpleNamespace(encode=lambda *args: schedules, forget=lambda: None)
    chunks = [1, 0]
    x, context = torch.randn(IMAGES, 32, 8, 8).repeat(2, 1, 1, 1), torch.randn(2 * IMAGES, 77, 2048)

    def sample(*args, **kwargs):
        denoiser_step(job.pass_, 0, total=2)
        patcher = shared.sd_model.forge_objects.unet
        module, seen, stop = first_attn2_capture(patcher)
        options = {"cond_or_uncond": chunks, "sigmas": torch.rand(IMAGES)}
        run_unet_as_forge(patcher, x, torch.full((2 * IMAGES,), 0.7), context, options, y=torch.randn(2 * IMAGES, SDXL_ADM_CHANNELS))
        stop()
        rows = positive_chunks(chunks, 2 * IMAGES, "cpu").rows.tolist()
        stock = module.to_out(attention_function(module.to_q(seen["x"]), module.to_k(context), module.to_v(context), module.heads))
        assert torch.equal(seen["out"][:IMAGES], stock[:IMAGES])
        negatives = [job.pass_.negative[i : i + 1] for i in range(IMAGES)]
        expected = reference_guided_rows(module, seen["x"], context, rows, negatives, PARAMS.scale, PARAMS.tau, PARAMS.alpha)
        record_difference((seen["out"][rows] - expected).abs().max().item())
        assert (seen["out"][rows] - expected).abs().max() <= 1e-5
        denoiser_step(job.pass_, 1, total=2)

    p = SimpleNamespace(sample=sample, is_hr_pass=False, extra_generation_params={})
    job = NagJob(host, p, PARAMS)
    job.start_pass()
    p.sample()
    job.end()
    line = "[NAG] active on SDXL: first pass 1/2 steps guided (7 cross-attention calls), 7 cross-attention layers hooked"
    assert line in capsys.readouterr().out
