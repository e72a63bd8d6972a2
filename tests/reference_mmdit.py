"""An independent reference of NAG on SD3/SD3.5's MMDiT, written from the authors' ComfyUI-NAG
(ChenDarYen/ComfyUI-NAG @ ef8a641: sd3/mmdit.py ``NAGOpenAISignatureMMDITWrapper.forward``,
``forward_core_with_concat`` and ``_nag_block_mixing``; utils.py ``cat_context``): the NAG rows are
appended to the batch (context: the NAG negative's; adaLN vector: the last rows' timestep embedding
plus the NAG negative's pooled vector), and in each joint block they attend with the last rows' image
q/k/v; the last rows' image attention output is guided; ``attn2`` (MMDiT-X) and the final layer see
the batch only. Both contexts are brought to one length by repeating them (the padding in front); the
authors' SD3 path attends over that padding, this one cuts it before each attention, as their Flux path
does (for contexts of equal length the two are the same). It runs a float64 copy of a stand-in model,
whose last ``len(nag_context)`` rows are the positive ones (the ComfyUI layout)."""

import copy

import torch
from reference import reference_attention, reference_nag
from reference_joint import cat_context


def flat(qkv):
    """q, k (``[B, L, H·Dh]``) and v (``[B, L, H, Dh]``) all ``[B, L, H·Dh]``."""
    return [t.flatten(2) for t in qkv]


def joint_attention(context_qkv, x_qkv, heads, pad):
    """Attention over ``[context without its padding; image]``: (context output, image output)."""
    q, k, v = (torch.cat((context[:, pad:], image), dim=1) for context, image in zip(flat(context_qkv), flat(x_qkv), strict=True))
    out = reference_attention(q, k, v, heads)
    return out[:, : q.shape[1] - x_qkv[0].shape[1]], out[:, q.shape[1] - x_qkv[0].shape[1] :]


def rows(intermediates, selected, pad):
    """The context intermediates (stream, gate, shift, scale, gate) of the selected rows, the stream unpadded."""
    stream, *vectors = intermediates
    return (stream[selected, pad:], *(vector[selected] for vector in vectors))


def nag_block_mixing(block, context, x, c, pads, nag):
    """``_nag_block_mixing``: the NAG rows (last ``bn`` of ``context`` and ``c``) reuse the last rows'
    image q/k/v; the last rows' image attention output is guided."""
    context_block, x_block = block.context_block, block.x_block
    bn, (context_pad, nag_pad) = len(context) - len(x), pads
    context_qkv, context_intermediates = context_block.pre_attention(context, c)
    self_attention = getattr(x_block, "x_block_self_attn", False)
    if self_attention:
        x_qkv, x_qkv2, x_intermediates = x_block.pre_attention_x(x, c[:-bn])
    else:
        x_qkv, x_intermediates = x_block.pre_attention(x, c[:-bn])
    heads = x_block.attn.num_heads
    context_attn, x_attn = joint_attention([t[:-bn] for t in context_qkv], x_qkv, heads, context_pad)
    nag_attn, x_attn_negative = joint_attention([t[-bn:] for t in context_qkv], [t[-bn:] for t in x_qkv], heads, nag_pad)
    x_attn = torch.cat([x_attn[:-bn], reference_nag(x_attn[-bn:], x_attn_negative, *nag)])
    if context_block.pre_only:
        context = None
    else:
        context = context.clone()
        for selected, attn, pad in ((slice(None, -bn), context_attn, context_pad), (slice(-bn, None), nag_attn, nag_pad)):
            context[selected, pad:] = context_block.post_attention(attn, *rows(context_intermediates, selected, pad))
    if self_attention:
        attn2 = reference_attention(*flat(x_qkv2), x_block.attn2.num_heads)
        return context, x_block.post_attention_x(x_attn, attn2, *x_intermediates)
    return context, x_block.post_attention(x_attn, *x_intermediates)


def reference_mmdit(model, x, t, context, nag_context, nag, y=None, nag_y=None, skip_layers=()):
    """The model's output with NAG on the last ``len(nag_context)`` rows, in float64 (returned as x's
    dtype). ``nag`` is (scale, tau, alpha); ``t`` is what the model embeds (σ·1000); ``skip_layers``
    the joint blocks Forge skips."""
    model = copy.deepcopy(model).double()
    dtype, (x, t, context, nag_context) = x.dtype, (v.double() for v in (x, t, context, nag_context))
    bn, hw = len(nag_context), x.shape[-2:]
    context, *pads = cat_context(context, nag_context)
    image = model.x_embedder(x) + model.cropped_pos_embed(hw)
    c = model.t_embedder(t, dtype=image.dtype)
    c = torch.cat((c, c[-bn:]))
    if y is not None:
        c = c + model.y_embedder(torch.cat((y, nag_y)).double())
    context = model.context_embedder(context)
    for index, block in enumerate(model.joint_blocks):
        if index not in skip_layers:
            context, image = nag_block_mixing(block, context, image, c, pads, nag)
    return model.unpatchify(model.final_layer(image, c[: len(image)]), hw=hw).to(dtype)
