"""Mirrors backend/nn/chroma.py of Forge main dfdcbab6 (Chroma): Flux blocks without modulation
layers, fed ``ModulationOut``s cut from the distilled guidance layer's output; the same classes,
attribute names and order of operations, written from its behaviour."""

from dataclasses import dataclass

import torch
from torch import nn

from backend.nn import flux

# Forge's chroma.py has these at module level (its blocks call them); NAG reads them from the
# blocks' module, so they stay here although the blocks now inherit their use from flux's.
from backend.nn.flux import (
    EmbedND,
    MLPEmbedder,
    RMSNorm,
    attention,  # noqa: F401
    image_from_patches,
    patches_and_ids,
    timestep_embedding,
)
from backend.utils import fp16_fix  # noqa: F401


class Approximator(nn.Module):
    def __init__(self, in_dim, out_dim, hidden_dim, n_layers=4):
        super().__init__()
        self.in_proj = nn.Linear(in_dim, hidden_dim, bias=True)
        self.layers = nn.ModuleList([MLPEmbedder(hidden_dim, hidden_dim) for _ in range(n_layers)])
        self.norms = nn.ModuleList([RMSNorm(hidden_dim) for _ in range(n_layers)])
        self.out_proj = nn.Linear(hidden_dim, out_dim)

    def forward(self, x):
        x = self.in_proj(x)
        for layer, norm in zip(self.layers, self.norms, strict=True):
            x = x + layer(norm(x))
        return self.out_proj(x)


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


def _triple(mod):
    return mod.shift, mod.scale, mod.gate


class DoubleStreamBlock(flux.DoubleStreamBlock):
    """Flux's block without its modulation layers; ``mod`` is ``((img_mod1, img_mod2), (txt_mod1, txt_mod2))``."""

    def __init__(self, hidden_size, num_heads, mlp_ratio, qkv_bias=False):
        super().__init__(hidden_size, num_heads, mlp_ratio, qkv_bias)
        del self.img_mod, self.txt_mod

    def forward(self, img, txt, mod, pe):
        (img_mod1, img_mod2), (txt_mod1, txt_mod2) = mod
        return self.modulated_forward(img, txt, (_triple(img_mod1), _triple(img_mod2)), (_triple(txt_mod1), _triple(txt_mod2)), pe)


class SingleStreamBlock(flux.SingleStreamBlock):
    """Flux's block without its modulation layer; ``mod`` is a ``ModulationOut``."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__(hidden_size, num_heads, mlp_ratio)
        del self.modulation

    def forward(self, x, mod, pe):
        return self.modulated_forward(x, _triple(mod), pe)


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)

    def forward(self, x, mod):
        shift, scale = (t.squeeze(1) for t in mod)
        return self.linear((1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :])


class IntegratedChromaTransformer2DModel(nn.Module):
    def __init__(
        self, in_channels, context_in_dim, hidden_size, mlp_ratio, num_heads, depth, depth_single_blocks, axes_dim, theta, qkv_bias,
        guidance_out_dim, guidance_hidden_dim, guidance_n_layers,
    ):  # fmt: skip
        super().__init__()
        self.in_channels = in_channels * 4
        self.out_channels = self.in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pe_embedder = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=axes_dim)
        self.img_in = nn.Linear(self.in_channels, hidden_size, bias=True)
        self.distilled_guidance_layer = Approximator(64, guidance_out_dim, guidance_hidden_dim, guidance_n_layers)
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.double_blocks = nn.ModuleList([DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias) for _ in range(depth)])
        self.single_blocks = nn.ModuleList([SingleStreamBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth_single_blocks)])
        self.final_layer = LastLayer(hidden_size, 1, self.out_channels)

    @staticmethod
    def distribute_modulations(tensor, single_block_count=38, double_blocks_count=19):
        """``[B, 12·double + 3·single + 2, D]`` cut in order: each single block's ModulationOut, each
        double block's image pair, each double block's text pair, then the final layer's shift and scale."""
        vectors = iter(tensor.split(1, dim=1))

        def modulation():
            return ModulationOut(shift=next(vectors), scale=next(vectors), gate=next(vectors))

        block_dict = {f"single_blocks.{i}.modulation.lin": modulation() for i in range(single_block_count)}
        block_dict |= {f"double_blocks.{i}.img_mod.lin": [modulation(), modulation()] for i in range(double_blocks_count)}
        block_dict |= {f"double_blocks.{i}.txt_mod.lin": [modulation(), modulation()] for i in range(double_blocks_count)}
        block_dict["final_layer.adaLN_modulation.1"] = [next(vectors), next(vectors)]
        return block_dict

    def inner_forward(self, img, img_ids, txt, txt_ids, timesteps):
        img = self.img_in(img)
        mod_index_length = len(self.double_blocks) * 12 + len(self.single_blocks) * 3 + 2
        distill_timestep = timestep_embedding(timesteps.detach().clone(), 16).to(device=img.device, dtype=img.dtype)
        distil_guidance = timestep_embedding(torch.zeros_like(timesteps), 16).to(device=img.device, dtype=img.dtype)
        modulation_index = timestep_embedding(torch.arange(mod_index_length), 32).to(device=img.device, dtype=img.dtype)
        modulation_index = modulation_index.unsqueeze(0).repeat(img.shape[0], 1, 1)
        timestep_guidance = torch.cat([distill_timestep, distil_guidance], dim=1).unsqueeze(1).repeat(1, mod_index_length, 1)
        mod_vectors = self.distilled_guidance_layer(torch.cat([timestep_guidance, modulation_index], dim=-1))
        mods = self.distribute_modulations(mod_vectors, len(self.single_blocks), len(self.double_blocks))
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for i, block in enumerate(self.double_blocks):
            double_mod = [mods[f"double_blocks.{i}.img_mod.lin"], mods[f"double_blocks.{i}.txt_mod.lin"]]
            img, txt = block(img=img, txt=txt, mod=double_mod, pe=pe)
        img = torch.cat((txt, img), 1)
        for i, block in enumerate(self.single_blocks):
            img = block(img, mod=mods[f"single_blocks.{i}.modulation.lin"], pe=pe)
        return self.final_layer(img[:, txt.shape[1] :, ...], mods["final_layer.adaLN_modulation.1"])

    def forward(self, x, timestep, context, **kwargs):
        img, img_ids, txt_ids, (h, w) = patches_and_ids(x, context)
        return image_from_patches(self.inner_forward(img, img_ids, context, txt_ids, timestep), h, w)
