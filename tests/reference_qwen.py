"""An independent reference of NAG on Qwen-Image and Qwen-Image-Edit. The authors' ComfyUI-NAG
(ChenDarYen/ComfyUI-NAG @ ef8a641) has no Qwen code; this applies their dual-stream pattern (flux/layers.py
NAGDoubleStreamBlock, flux/model.py NAGFlux with Kontext references, utils.py cat_context) to Qwen-Image
as Forge Neo runs it (backend/nn/qwen.py of exo101/sd-webui-forge-neo-v3 @ 5692d2d1):

- the NAG rows are appended to the text batch; both contexts are brought to one length by repeating
  them (the padding in front) and the padding is cut before each attention;
- the NAG rows' modulation is their positive rows' ``temb`` (Qwen-Image has no pooled text, so the
  authors' "negative pooled vector" has nothing to give);
- in each block the NAG rows attend over their own text and the last rows' image q/k/v, reference
  tokens included; the last rows' image attention output (reference tokens too) is guided before
  ``to_out``; every text stream keeps its own unguided output;
- Qwen-Image-Edit's references (``index`` ids: index k, centred grid) are appended to every row's image
  tokens and cut after the final layer.

The tokens, position ids, text positions (``txt_start + j`` on all axes, ``txt_start`` from the image
size), modulation arithmetic, rotation, attention and unpatchify are written here; the model's layers
(linears, norms, the rotary and time embedders, the final layer) are called. It runs a float64 copy of
a stand-in model, whose last ``len(nag_context)`` rows are the positive ones (the ComfyUI layout)."""

import copy

import torch
from reference import reference_nag
from reference_joint import cat_context, rope_attention

STREAMS = {
    "img": ("to_q", "to_k", "to_v", "norm_q", "norm_k"),
    "txt": ("add_q_proj", "add_k_proj", "add_v_proj", "norm_added_q", "norm_added_k"),
}


def patches(x, index=0):
    """``[B, C, 1, H, W]`` → circular-padded 2×2 patches ``[B, (H/2)(W/2), 4C]`` (channel, row, column)
    and ids ``(index, row − rows/2, column − columns/2)``."""
    batch, channels, _, h, w = x.shape
    x = torch.nn.functional.pad(x[:, :, 0], (0, w % 2, 0, h % 2), mode="circular")
    rows, columns = (h + 1) // 2, (w + 1) // 2
    tokens = x.reshape(batch, channels, rows, 2, columns, 2).permute(0, 2, 4, 1, 3, 5).reshape(batch, rows * columns, 4 * channels)
    row, column = torch.meshgrid(torch.arange(rows) - rows // 2, torch.arange(columns) - columns // 2, indexing="ij")
    ids = torch.stack([torch.full_like(row, index), row, column], dim=-1).reshape(1, -1, 3).double()
    return tokens, ids.expand(batch, -1, -1)


def modulated(x, norm, mod):
    shift, scale, gate = mod.chunk(3, dim=-1)
    return norm(x) * (1 + scale[:, None]) + shift[:, None], gate[:, None]


def stream_qkv(attn, x, stream):
    """q, k, v ``[B, H, L, Dh]`` of one stream, q and k normed."""
    to_q, to_k, to_v, norm_q, norm_k = (getattr(attn, name) for name in STREAMS[stream])
    q, k, v = (p(x).reshape(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2) for p in (to_q, to_k, to_v))
    return norm_q(q), norm_k(k), v


def nag_block(block, img, txt, temb, pe, pe_negative, pads, nag):
    """One dual-stream block; the NAG rows (the last ``bn`` of ``txt`` and ``temb``) reuse the last rows' image q/k/v."""
    bn, (context_pad, nag_pad), attn = len(txt) - len(img), pads, block.attn
    img_mod1, img_mod2 = block.img_mod(temb[:-bn]).chunk(2, dim=-1)
    txt_mod1, txt_mod2 = block.txt_mod(temb).chunk(2, dim=-1)
    img_in, img_gate = modulated(img, block.img_norm1, img_mod1)
    txt_in, txt_gate = modulated(txt, block.txt_norm1, txt_mod1)
    image, text = stream_qkv(attn, img_in, "img"), stream_qkv(attn, txt_in, "txt")
    positive = [torch.cat((t[:-bn, :, context_pad:], i), dim=2) for t, i in zip(text, image, strict=True)]
    negative = [torch.cat((t[-bn:, :, nag_pad:], i[-bn:]), dim=2) for t, i in zip(text, image, strict=True)]
    out, out_negative = rope_attention(*positive, pe), rope_attention(*negative, pe_negative)
    length, length_negative = txt.shape[1] - context_pad, txt.shape[1] - nag_pad
    img_attn = torch.cat([out[:-bn, length:], reference_nag(out[-bn:, length:], out_negative[:, length_negative:], *nag)])
    img = img + img_gate * attn.to_out[0](img_attn)
    img_in2, img_gate2 = modulated(img, block.img_norm2, img_mod2)
    img = img + img_gate2 * block.img_mlp(img_in2)
    txt = txt.clone()
    txt[:-bn, context_pad:] += txt_gate[:-bn] * attn.to_add_out(out[:, :length])
    txt[-bn:, nag_pad:] += txt_gate[-bn:] * attn.to_add_out(out_negative[:, :length_negative])
    txt_in2, txt_gate2 = modulated(txt, block.txt_norm2, txt_mod2)
    return img, txt + txt_gate2 * block.txt_mlp(txt_in2)


def reference_qwen(model, x, timestep, context, nag_context, nag, refs=()):
    """The model's output with NAG on the last ``len(nag_context)`` rows, in float64 (returned as x's
    dtype). ``nag`` is (scale, tau, alpha); ``timestep`` is σ; ``refs`` Qwen-Image-Edit's reference
    latents ``[1, C, 1, h, w]``, the same for every row."""
    model = copy.deepcopy(model).double()
    dtype, (x, timestep, context, nag_context) = x.dtype, (t.double() for t in (x, timestep, context, nag_context))
    bn, rows, (h, w) = len(nag_context), len(x), x.shape[-2:]
    img, img_ids = patches(x)
    img_tokens = img.shape[1]
    for index, ref in enumerate(refs, start=1):
        tokens, ids = patches(ref.double().expand(rows, -1, -1, -1, -1), index)
        img, img_ids = torch.cat((img, tokens), dim=1), torch.cat((img_ids, ids), dim=1)
    start = max(((w + 1) // 2) // 2, ((h + 1) // 2) // 2)

    def text_ids(count, length):
        return (start + torch.arange(length)).double()[None, :, None].expand(count, -1, 3)

    pe = model.pe_embedder(torch.cat((text_ids(rows, context.shape[1]), img_ids), dim=1)).double()
    pe_negative = model.pe_embedder(torch.cat((text_ids(bn, nag_context.shape[1]), img_ids[-bn:]), dim=1)).double()
    txt, *pads = cat_context(context, nag_context)
    img = model.img_in(img)
    txt = model.txt_in(model.txt_norm(txt))
    temb = model.time_text_embed(timestep, img)
    temb = torch.cat((temb, temb[-bn:]))
    for block in model.transformer_blocks:
        img, txt = nag_block(block, img, txt, temb, pe, pe_negative, pads, nag)
    out = model.proj_out(model.norm_out(img, temb[:-bn]))[:, :img_tokens]
    rows_h, columns = (h + 1) // 2, (w + 1) // 2
    image = out.reshape(rows, rows_h, columns, -1, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(rows, -1, 1, rows_h * 2, columns * 2)
    return image[..., :h, :w].to(dtype)
