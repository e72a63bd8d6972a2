"""Mirrors backend/nn/chroma.py of Forge Neo (its port of ComfyUI v0.10 comfy/ldm/chroma), the Chroma
model only: the same class and attribute names and order of operations, written from its behaviour.
Haoming02's own file is not in the search index; it was read in a copy of Neo v3.5,
exo101/sd-webui-forge-neo-v3 @ 5692d2d1e6c293faf5486f7cb18c27c9a3faa758 (``webui/backend/nn/chroma.py``,
added in f95f632a), which imports ``DoubleStreamBlock``, ``SingleStreamBlock``, ``ModulationOut``,
``EmbedND``, ``MLPEmbedder`` and ``timestep_embedding`` from Neo's ``backend/nn/flux.py`` and calls the
blocks as that file does at 06d6af9a (``modulation=False``: the block's ``vec`` is its modulations).

Left out: ``dit`` block replace patches (as in the Flux stand-in), ``lite``. Where Neo behaves as Forge
main, the main stand-in's pieces are used (``Approximator``; Neo's uses torch's ``RMSNorm``)."""

from types import SimpleNamespace

import torch
from einops import rearrange
from torch import nn

from backend.nn import flux_neo
from backend.nn.chroma import Approximator
from backend.nn.flux import EmbedND, timestep_embedding
from backend.nn.flux_neo import DoubleStreamBlock, ModulationOut, SingleStreamBlock
from backend.utils import fp16_fix

MOD_INDEX_LENGTH = 344  # fixed in Neo's forward_orig: 12·19 double + 3·38 single blocks + 2, whatever the model's depth


class ChromaModulationOut(ModulationOut):
    @classmethod
    def from_offset(cls, tensor, offset=0):
        """Three consecutive vectors ``[B, 1, D]`` from ``offset``: shift, scale, gate."""
        return cls(*(tensor[:, offset + i : offset + i + 1, :] for i in range(3)))


class LastLayer(nn.Module):
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)

    def forward(self, x, vec):
        shift, scale = (t.squeeze(1)[:, None, :] for t in vec)
        return self.linear(torch.addcmul(shift, 1 + scale, self.norm_final(x)))


class IntegratedChromaTransformer2DModel(nn.Module):
    def __init__(
        self, in_channels, out_channels, context_in_dim, hidden_size, mlp_ratio, num_heads, depth, depth_single_blocks, axes_dim,
        theta, patch_size, qkv_bias, in_dim, out_dim, hidden_dim, n_layers,
    ):  # fmt: skip
        super().__init__()
        self.params = SimpleNamespace(depth=depth, depth_single_blocks=depth_single_blocks)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.axes_dim = axes_dim
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.pe_embedder = EmbedND(dim=hidden_size // num_heads, theta=theta, axes_dim=axes_dim)
        self.img_in = nn.Linear(in_channels, hidden_size, bias=True)
        self.txt_in = nn.Linear(context_in_dim, hidden_size)
        self.distilled_guidance_layer = Approximator(in_dim, out_dim, hidden_dim, n_layers)
        self.double_blocks = nn.ModuleList(
            [DoubleStreamBlock(hidden_size, num_heads, mlp_ratio, qkv_bias, modulation=False) for _ in range(depth)]
        )
        self.single_blocks = nn.ModuleList(
            [SingleStreamBlock(hidden_size, num_heads, mlp_ratio, modulation=False) for _ in range(depth_single_blocks)]
        )
        self.final_layer = LastLayer(hidden_size, 1, out_channels)
        self.skip_mmdit = []
        self.skip_dit = []

    def get_modulations(self, tensor, block_type, *, idx=0):
        """Cuts ``[B, 344, D]``: each single block's 3 vectors, then each double block's image 6, then
        each double block's text 6; "final" is the last 2 of the 344."""
        if block_type == "final":
            return tensor[:, -2:-1, :], tensor[:, -1:, :]
        if block_type == "single":
            return ChromaModulationOut.from_offset(tensor, 3 * idx)
        if block_type not in {"double_img", "double_txt"}:
            raise ValueError("block_type")
        offset = 6 * idx + 3 * self.params.depth_single_blocks + (6 * self.params.depth if block_type == "double_txt" else 0)
        return ChromaModulationOut.from_offset(tensor, offset), ChromaModulationOut.from_offset(tensor, offset + 3)

    def forward_orig(self, img, img_ids, txt, txt_ids, timesteps, guidance=None, control=None, transformer_options={}, attn_mask=None):  # noqa: B006
        """Neo's order: ``img_in``; the 344 modulation vectors (time, guidance and index embeddings
        through the distilled guidance layer); ``txt_in``; ``pe``; the double blocks not in
        ``skip_mmdit`` (ControlNet input adds); ``fp16_fix`` of the image; the single blocks not in
        ``skip_dit`` (ControlNet output adds on the image tokens); the final layer."""
        img = self.img_in(img)
        distill_timestep = timestep_embedding(timesteps.detach().clone(), 16).to(img.device, img.dtype)
        distil_guidance = timestep_embedding(guidance.detach().clone(), 16).to(img.device, img.dtype)
        modulation_index = timestep_embedding(torch.arange(MOD_INDEX_LENGTH, device=img.device), 32).to(img.device, img.dtype)
        modulation_index = modulation_index.unsqueeze(0).repeat(img.shape[0], 1, 1)
        timestep_guidance = torch.cat([distill_timestep, distil_guidance], dim=1).unsqueeze(1).repeat(1, MOD_INDEX_LENGTH, 1)
        mod_vectors = self.distilled_guidance_layer(torch.cat([timestep_guidance, modulation_index], dim=-1))
        txt = self.txt_in(txt)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
        for i, block in enumerate(self.double_blocks):
            transformer_options["block_index"] = i
            if i not in self.skip_mmdit:
                double_mod = (
                    self.get_modulations(mod_vectors, "double_img", idx=i),
                    self.get_modulations(mod_vectors, "double_txt", idx=i),
                )
                img, txt = block(img=img, txt=txt, vec=double_mod, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
                if control is not None and i < len(control["input"]) and control["input"][i] is not None:
                    img += control["input"][i]
        img = torch.cat((txt, fp16_fix(img)), 1)
        for i, block in enumerate(self.single_blocks):
            transformer_options["block_index"] = i
            if i not in self.skip_dit:
                single_mod = self.get_modulations(mod_vectors, "single", idx=i)
                img = block(img, vec=single_mod, pe=pe, attn_mask=attn_mask, transformer_options=transformer_options)
                if control is not None and i < len(control["output"]) and control["output"][i] is not None:
                    img[:, txt.shape[1] :, ...] += control["output"][i]
        return self.final_layer(img[:, txt.shape[1] :, ...], vec=self.get_modulations(mod_vectors, "final"))

    # Neo writes it inline, with the ids in x's dtype (the rotary embedding casts them to float32).
    process_img = flux_neo.IntegratedFluxTransformer2DModel.process_img

    def forward(self, x, timestep, context, guidance=None, control=None, transformer_options={}, **kwargs):  # noqa: B006
        """Patches and ids, zero text ids, ``forward_orig`` with the timestep as given (Chroma's predictor
        gives sigma) and zero guidance unless given (Neo writes ``guidance or zeros``), unpatched."""
        _, _, h_orig, w_orig = x.shape
        h_len, w_len = (h_orig + self.patch_size // 2) // self.patch_size, (w_orig + self.patch_size // 2) // self.patch_size
        img, img_ids = self.process_img(x)
        txt_ids = torch.zeros((x.shape[0], context.shape[1], 3), device=x.device, dtype=x.dtype)
        guidance = guidance if guidance is not None else torch.zeros_like(timestep)
        attn_mask = kwargs.get("attention_mask")
        out = self.forward_orig(img, img_ids, context, txt_ids, timestep, guidance, control, transformer_options, attn_mask=attn_mask)
        return rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=h_len, w=w_len, ph=self.patch_size, pw=self.patch_size)[
            :, :, :h_orig, :w_orig
        ]
