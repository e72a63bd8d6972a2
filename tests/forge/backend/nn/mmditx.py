"""Mirrors backend/nn/mmditx.py of Forge main (dfdcbab6; last changed in f23bc80d "SD3+", Stability
AI's sd3.5 reference MMDiT-X): the same class and attribute names and order of operations, written
from its behaviour. Where it behaves as A1111 1.10.1's SD3 MMDiT (the same reference), the A1111
stand-in's pieces are used (``modules/models/sd3/mmdit.py``: embedders, ``SelfAttention`` with the
``rms`` qk-norm SD3.5 uses, ``DismantledBlock``, ``FinalLayer``, ``cropped_pos_embed``, ``unpatchify``).

What Forge adds and this mirrors: ``attention`` defined in this module; MMDiT-X blocks
(``x_block_self_attn``: an ``attn2`` self-attention over the image tokens, 9 modulations,
``pre_attention_x``/``post_attention_x``), in ``x_block_self_attn_layers`` (layers 0–12 when
``pos_embed_max_size`` is 384: SD3.5 Medium); ``out_channels`` fixed at 16; ``forward(x, t, y=None,
context=None, control=None, transformer_options={}, **kwargs)`` with ``transformer_options["skip_layers"]``
(whole joint blocks skipped) and ControlNet residuals added after each block. Left out: ``attn1_dropout``
(training), register tokens, ``rmsnorm``/``scale_mod_only``/``swiglu``, ``verbose``."""

import torch
from modules.models.sd3 import mmdit
from modules.models.sd3.mmdit import FinalLayer, SelfAttention, modulate
from modules.models.sd3.other_impls import attention
from torch import nn


class DismantledBlock(mmdit.DismantledBlock):
    def __init__(self, hidden_size, num_heads, qkv_bias=False, pre_only=False, qk_norm=None, x_block_self_attn=False, **kwargs):
        super().__init__(hidden_size, num_heads, qkv_bias=qkv_bias, pre_only=pre_only, qk_norm=qk_norm, **kwargs)
        self.x_block_self_attn = x_block_self_attn
        if x_block_self_attn:
            self.attn2 = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm)
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 9 * hidden_size))

    def pre_attention_x(self, x, c):
        """Both attentions' q/k/v from one ``norm1(x)``, each with its own shift and scale."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2, gate_msa2 = self.adaLN_modulation(c).chunk(
            9, dim=1
        )
        x_norm = self.norm1(x)
        qkv = self.attn.pre_attention(modulate(x_norm, shift_msa, scale_msa))
        qkv2 = self.attn2.pre_attention(modulate(x_norm, shift_msa2, scale_msa2))
        return qkv, qkv2, (x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2)

    def post_attention_x(self, attn, attn2, x, gate_msa, shift_mlp, scale_mlp, gate_mlp, gate_msa2):
        x = x + gate_msa.unsqueeze(1) * self.attn.post_attention(attn)
        x = x + gate_msa2.unsqueeze(1) * self.attn2.post_attention(attn2)
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


def block_mixing(context, x, context_block, x_block, c):
    """A1111's, plus the MMDiT-X image self-attention (``attn2``) beside the joint attention."""
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    if x_block.x_block_self_attn:
        x_qkv, x_qkv2, x_intermediates = x_block.pre_attention_x(x, c)
    else:
        x_qkv, x_intermediates = x_block.pre_attention(x, c)
    q, k, v = (torch.cat(tuple(qkv[i] for qkv in [context_qkv, x_qkv]), dim=1) for i in range(3))
    attn = attention(q, k, v, x_block.attn.num_heads)
    context_attn, x_attn = attn[:, : context_qkv[0].shape[1]], attn[:, context_qkv[0].shape[1] :]
    context = None if context_block.pre_only else context_block.post_attention(context_attn, *context_intermediates)
    if x_block.x_block_self_attn:
        attn2 = attention(*x_qkv2, x_block.attn2.num_heads)
        return context, x_block.post_attention_x(x_attn, attn2, *x_intermediates)
    return context, x_block.post_attention(x_attn, *x_intermediates)


class JointBlock(nn.Module):
    def __init__(self, *args, **kwargs):
        super().__init__()
        pre_only = kwargs.pop("pre_only")
        x_block_self_attn = kwargs.pop("x_block_self_attn", False)
        self.context_block = DismantledBlock(*args, pre_only=pre_only, **kwargs)
        self.x_block = DismantledBlock(*args, pre_only=False, x_block_self_attn=x_block_self_attn, **kwargs)

    def forward(self, *args, **kwargs):
        return block_mixing(*args, context_block=self.context_block, x_block=self.x_block, **kwargs)


class MMDiTX(mmdit.MMDiT):
    def __init__(self, depth=2, pos_embed_max_size=8, qk_norm=None, x_block_self_attn_layers=(), **kwargs):
        super().__init__(in_channels=16, depth=depth, pos_embed_max_size=pos_embed_max_size, qk_norm=qk_norm, **kwargs)
        self.x_block_self_attn_layers = list(range(13)) if pos_embed_max_size == 384 else list(x_block_self_attn_layers)
        hidden_size, num_heads = 64 * depth, depth
        self.joint_blocks = nn.ModuleList(
            JointBlock(
                hidden_size,
                num_heads,
                qkv_bias=True,
                pre_only=i == depth - 1,
                qk_norm=qk_norm,
                x_block_self_attn=i in self.x_block_self_attn_layers,
            )
            for i in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, self.patch_size, self.out_channels)

    def forward_core_with_concat(self, x, c_mod, context=None, skip_layers=(), controlnet_hidden_states=None):
        for i, block in enumerate(self.joint_blocks):
            if i in skip_layers:
                continue
            context, x = block(context, x, c=c_mod)
            if controlnet_hidden_states is not None:
                x = x + controlnet_hidden_states[i // (len(self.joint_blocks) // len(controlnet_hidden_states))]
        return self.final_layer(x, c_mod)

    def forward(self, x, t, y=None, context=None, control=None, transformer_options={}, **kwargs):  # noqa: B006 (Forge's signature)
        """``t`` is σ·1000 (``KModel.apply_model``); the positional embedding is cast to x."""
        hw = x.shape[-2:]
        x = self.x_embedder(x) + self.cropped_pos_embed(hw).to(x.device, x.dtype)
        c = self.t_embedder(t, dtype=x.dtype)
        if y is not None:
            c = c + self.y_embedder(y)
        context = self.context_embedder(context)
        x = self.forward_core_with_concat(x, c, context, transformer_options.get("skip_layers", []), control)
        return self.unpatchify(x, hw=hw)
