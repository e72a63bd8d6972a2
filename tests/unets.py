"""Tiny real ``ldm`` UNets with random weights, shaped like SD1 and SDXL."""

import torch
from ldm.modules.diffusionmodules.openaimodel import UNetModel
from ldm.modules.diffusionmodules.util import linear
from torch import nn

SDXL_ADM_CHANNELS = 2816


def sd1_like_unet(context_dim: int = 768, model_channels: int = 32, in_channels: int = 4) -> UNetModel:
    """SD1 layout in miniature: conv proj_in/out transformers, context 768 (8 input channels: InstructPix2Pix)."""
    return UNetModel(
        image_size=8,
        in_channels=in_channels,
        model_channels=model_channels,
        out_channels=4,
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        channel_mult=[1, 2],
        num_head_channels=8,
        use_spatial_transformer=True,
        transformer_depth=1,
        context_dim=context_dim,
        legacy=False,
    ).eval()


def sdxl_like_unet(
    context_dim: int = 2048, model_channels: int = 32, adm_channels: int = SDXL_ADM_CHANNELS, latent_channels: int = 4
) -> UNetModel:
    """SDXL layout in miniature: linear transformers, context 2048, and the ``sequential``
    class embedding of ``sgm``'s UNet over the 2816-wide ``vector`` (adm) input (``latent_channels``
    32: Mugen's, an SDXL UNet on Flux.2's latents).

    ``sgm`` is not on PyPI, so this grafts sgm's label embedding (a nested Sequential of
    Linear–SiLU–Linear) onto ``ldm``'s UNetModel, whose forward adds ``label_emb(y)`` to the
    time embedding exactly as sgm's does.
    """
    unet = UNetModel(
        image_size=8,
        in_channels=latent_channels,
        model_channels=model_channels,
        out_channels=latent_channels,
        num_res_blocks=1,
        attention_resolutions=[1, 2],
        channel_mult=[1, 2],
        num_head_channels=8,
        use_spatial_transformer=True,
        use_linear_in_transformer=True,
        transformer_depth=1,
        context_dim=context_dim,
        legacy=False,
    )
    embed_dim = model_channels * 4
    unet.num_classes = "sequential"
    unet.label_emb = nn.Sequential(nn.Sequential(linear(adm_channels, embed_dim), nn.SiLU(), linear(embed_dim, embed_dim)))
    return unet.eval()


def randomize_outputs(unet: UNetModel) -> UNetModel:
    """ldm zero-initialises out-projections; give them weights so every layer matters."""
    for param in unet.parameters():
        if torch.count_nonzero(param) == 0:
            nn.init.normal_(param, std=0.02)
    return unet


def attn2_modules(unet: nn.Module) -> dict[str, nn.Module]:
    return {name: module for name, module in unet.named_modules() if name.endswith(".attn2")}
