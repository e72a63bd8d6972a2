"""An independent reference of NAG on Flux.1 and Chroma, written from the authors' ComfyUI-NAG
(ChenDarYen/ComfyUI-NAG @ ef8a641: flux/model.py NAGFlux, flux/layers.py NAGDoubleStreamBlock and
NAGSingleStreamBlock, chroma/model.py NAGChroma (on ComfyUI's Chroma, as Neo's port: ``get_modulations``
of 344 vectors; on Forge main's: ``distribute_modulations``), utils.py cat_context): the NAG rows are appended to
the batch, both text contexts are brought to one length by repeating them (the padding in front),
and the padding is cut before each attention. It runs a float64 copy of a stand-in model, whose last
``len(nag_context)`` rows are the positive ones (the ComfyUI layout). Flux.1 Kontext as NAGFlux.forward:
the reference latents' tokens (ComfyUI's "offset" ids: index 1, offsets past the earlier references)
are appended to the image tokens, go through the blocks as image tokens (their q/k/v reused by the
NAG rows, their attention output guided) and are cut after the final layer."""

import copy
import math
from types import SimpleNamespace

import torch
from backend.nn.flux import timestep_embedding
from einops import rearrange
from reference import reference_nag


def cat_context(context, nag_context):
    """Both contexts at the longer length, each repeated and its last tokens kept, NAG rows last."""
    length = max(context.shape[1], nag_context.shape[1])

    def padded(t):
        return t.repeat(1, math.ceil(length / t.shape[1]), 1)[:, -length:]

    return torch.cat([padded(context), padded(nag_context)]), length - context.shape[1], length - nag_context.shape[1]


def rope_attention(q, k, v, pe):
    """RoPE on q and k, softmax attention per head, heads merged: ``[B, H, L, Dh]`` → ``[B, L, H·Dh]``."""

    def rotate(t):
        pairs = t.reshape(*t.shape[:-1], -1, 1, 2)
        return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(t.shape)

    q, k = rotate(q), rotate(k)
    weights = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(dim=-1)
    out = weights @ v
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], -1)


def triple(chunks):
    return SimpleNamespace(shift=chunks[0], scale=chunks[1], gate=chunks[2])


def unpacked(modulation):
    """A Modulation layer's output as shift/scale/gate objects: Forge main's tensors (6 or 3), or
    the ModulationOut objects of the ComfyUI port (a single block's second one is None)."""
    if isinstance(modulation[0], torch.Tensor):
        return [triple(modulation[start : start + 3]) for start in range(0, len(modulation), 3)]
    return [m for m in modulation if m is not None]


def split_qkv(qkv, heads):
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


def nag_double(block, img, txt, img_mods, txt_mods, pe, pe_negative, pads, nag):
    """NAGDoubleStreamBlock.forward: NAG rows only in ``txt``; they reuse the last rows' image q/k/v."""
    (img_mod1, img_mod2), (txt_mod1, txt_mod2) = img_mods, txt_mods
    bn = len(txt) - len(img)
    context_pad, nag_pad = pads
    img_q, img_k, img_v = split_qkv(block.img_attn.qkv((1 + img_mod1.scale) * block.img_norm1(img) + img_mod1.shift), block.num_heads)
    img_q, img_k = block.img_attn.norm(img_q, img_k, img_v)
    txt_q, txt_k, txt_v = split_qkv(block.txt_attn.qkv((1 + txt_mod1.scale) * block.txt_norm1(txt) + txt_mod1.shift), block.num_heads)
    txt_q, txt_k = block.txt_attn.norm(txt_q, txt_k, txt_v)
    positive = [torch.cat((t[:-bn, :, context_pad:], i), dim=2) for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
    negative = [torch.cat((t[-bn:, :, nag_pad:], i[-bn:]), dim=2) for t, i in ((txt_q, img_q), (txt_k, img_k), (txt_v, img_v))]
    attn, attn_negative = rope_attention(*positive, pe), rope_attention(*negative, pe_negative)
    txt_length, txt_length_negative = txt.shape[1] - context_pad, txt.shape[1] - nag_pad
    txt_attn, img_attn = attn[:, :txt_length], attn[:, txt_length:]
    img_attn = torch.cat([img_attn[:-bn], reference_nag(img_attn[-bn:], attn_negative[:, txt_length_negative:], *nag)])
    img = img + img_mod1.gate * block.img_attn.proj(img_attn)
    img = img + img_mod2.gate * block.img_mlp((1 + img_mod2.scale) * block.img_norm2(img) + img_mod2.shift)
    txt = txt.clone()
    txt[:-bn, context_pad:] += txt_mod1.gate[:-bn] * block.txt_attn.proj(txt_attn)
    txt[-bn:, nag_pad:] += txt_mod1.gate[-bn:] * block.txt_attn.proj(attn_negative[:, :txt_length_negative])
    return img, txt + txt_mod2.gate * block.txt_mlp((1 + txt_mod2.scale) * block.txt_norm2(txt) + txt_mod2.shift)


def nag_single(block, x, mod, pe, pe_negative, txt_length, bn, pads, nag):
    """NAGSingleStreamBlock.forward (the ``txt_length`` path): the guided image output goes into both
    the positive and the NAG rows; each keeps its own MLP half and gate."""
    context_pad, nag_pad = pads
    mlp_width = getattr(block, "mlp_hidden_dim_first", block.mlp_hidden_dim)  # twice linear2's for a gated MLP (Flux.2)
    qkv, mlp = torch.split(block.linear1((1 + mod.scale) * block.pre_norm(x) + mod.shift), [3 * block.hidden_size, mlp_width], -1)
    q, k, v = split_qkv(qkv, block.num_heads)
    q, k = block.norm(q, k, v)
    attn = rope_attention(q[:-bn, :, context_pad:], k[:-bn, :, context_pad:], v[:-bn, :, context_pad:], pe)
    attn_negative = rope_attention(q[-bn:, :, nag_pad:], k[-bn:, :, nag_pad:], v[-bn:, :, nag_pad:], pe_negative)
    guided = reference_nag(attn[-bn:, txt_length - context_pad :], attn_negative[:, txt_length - nag_pad :], *nag)
    attn_negative[:, txt_length - nag_pad :] = guided
    attn[-bn:, txt_length - context_pad :] = guided
    output = block.linear2(torch.cat((attn, block.mlp_act(mlp[:-bn, context_pad:])), 2))
    output_negative = block.linear2(torch.cat((attn_negative, block.mlp_act(mlp[-bn:, nag_pad:])), 2))
    x = x.clone()
    x[:-bn, context_pad:] += mod.gate[:-bn] * output
    x[-bn:, nag_pad:] += mod.gate[-bn:] * output_negative
    return x


def process_img(x, index=0, h_offset=0, w_offset=0):
    bs, _, h, w = x.shape
    x = torch.nn.functional.pad(x, (0, w % 2, 0, h % 2), mode="circular")
    img = rearrange(x, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
    rows, columns = torch.meshgrid(torch.arange((h + 1) // 2), torch.arange((w + 1) // 2), indexing="ij")
    rows, columns = rows + (h_offset + 1) // 2, columns + (w_offset + 1) // 2
    ids = torch.stack([torch.full_like(rows, index), rows, columns], dim=-1).reshape(1, -1, 3).to(x).repeat(bs, 1, 1)
    return img, ids


def with_references(img, img_ids, refs):
    """ComfyUI's Flux.forward with ``ref_latents`` ("offset"): each reference's tokens appended."""
    h = w = 0
    for ref in refs:
        h_offset, w_offset = (0, w) if ref.shape[-2] + h > ref.shape[-1] + w else (h, 0)
        tokens, ids = process_img(ref, index=1, h_offset=h_offset, w_offset=w_offset)
        img, img_ids = torch.cat((img, tokens), 1), torch.cat((img_ids, ids), 1)
        h, w = max(h, ref.shape[-2] + h_offset), max(w, ref.shape[-1] + w_offset)
    return img, img_ids


def chroma_vectors(model, timestep, length):
    """Chroma's ``length`` modulation vectors per row: the time, zero guidance and index embeddings
    through the distilled guidance layer."""
    time_guidance = torch.cat([timestep_embedding(timestep, 16), timestep_embedding(torch.zeros_like(timestep), 16)], 1)
    index = timestep_embedding(torch.arange(length), 32).double()
    return model.distilled_guidance_layer(
        torch.cat([time_guidance[:, None].expand(-1, length, -1), index[None].expand(len(timestep), -1, -1)], -1)
    )


def cut(modulation, bn):
    """A ModulationOut without its last ``bn`` rows."""
    return SimpleNamespace(shift=modulation.shift[:-bn], scale=modulation.scale[:-bn], gate=modulation.gate[:-bn])


def forge_chroma_modulations(model, timestep, bn):
    """NAGChroma's modulations on Forge main's Chroma: its vectors for its depth, distributed."""
    vectors = chroma_vectors(model, timestep, len(model.double_blocks) * 12 + len(model.single_blocks) * 3 + 2)
    mods = model.distribute_modulations(torch.cat((vectors, vectors[-bn:])), len(model.single_blocks), len(model.double_blocks))
    double_mods = [
        ([cut(m, bn) for m in mods[f"double_blocks.{i}.img_mod.lin"]], mods[f"double_blocks.{i}.txt_mod.lin"])
        for i in range(len(model.double_blocks))
    ]
    single_mods = [mods[f"single_blocks.{i}.modulation.lin"] for i in range(len(model.single_blocks))]
    return double_mods, single_mods, [t[:-bn] for t in mods["final_layer.adaLN_modulation.1"]]


def comfy_chroma_modulations(model, vectors, bn):
    """NAGChroma on ComfyUI's Chroma (Neo's port): the last ``bn`` rows' vectors appended for the NAG
    rows, ``get_modulations`` per block; the image stream and the final layer without the NAG rows."""
    vectors = torch.cat((vectors, vectors[-bn:]))
    double_mods = [
        ([cut(m, bn) for m in model.get_modulations(vectors, "double_img", idx=i)], model.get_modulations(vectors, "double_txt", idx=i))
        for i in range(len(model.double_blocks))
    ]
    single_mods = [model.get_modulations(vectors, "single", idx=i) for i in range(len(model.single_blocks))]
    return double_mods, single_mods, model.get_modulations(vectors[:-bn], "final")


def reference_joint(model, x, timestep, context, nag_context, nag, y=None, nag_y=None, guidance=None, refs=()):
    """The model's output with NAG on the last ``len(nag_context)`` rows, in float64 (returned as x's
    dtype). ``nag`` is (scale, tau, alpha); ``y``/``nag_y``/``guidance`` are Flux's, ``refs`` Kontext's
    reference latents (one row per row of ``x``); ``timestep`` is the one the blocks embed."""
    model = copy.deepcopy(model).double()
    dtype, (x, timestep, context, nag_context) = x.dtype, (t.double() for t in (x, timestep, context, nag_context))
    is_chroma, is_comfy_chroma = hasattr(model, "distribute_modulations"), hasattr(model, "get_modulations")
    bn, (h, w) = len(nag_context), x.shape[2:]
    img, img_ids = process_img(x)
    img_tokens = img.shape[1]
    img, img_ids = with_references(img, img_ids, [ref.double() for ref in refs])
    txt, *pads = cat_context(context, nag_context)
    img = model.img_in(img)
    pe = model.pe_embedder(torch.cat((torch.zeros(len(x), context.shape[1], 3).double(), img_ids), 1))
    pe_negative = model.pe_embedder(torch.cat((torch.zeros(bn, nag_context.shape[1], 3).double(), img_ids[-bn:]), 1)).double()
    pe = pe.double()
    txt = model.txt_in(txt)
    if is_comfy_chroma:
        double_mods, single_mods, final = comfy_chroma_modulations(model, chroma_vectors(model, timestep, 344), bn)
    elif is_chroma:
        double_mods, single_mods, final = forge_chroma_modulations(model, timestep, bn)
    else:
        vec = model.time_in(timestep_embedding(timestep, 256))
        if guidance is not None:
            vec = vec + model.guidance_in(timestep_embedding(guidance.double(), 256))
        vec = torch.cat((vec, vec[-bn:]))
        vec = vec + model.vector_in(torch.cat((y, nag_y)).double())

        double_mods = [(unpacked(b.img_mod(vec[:-bn])), unpacked(b.txt_mod(vec))) for b in model.double_blocks]
        single_mods = [unpacked(b.modulation(vec))[0] for b in model.single_blocks]
        final = vec[:-bn]
    for block, (img_mods, txt_mods) in zip(model.double_blocks, double_mods, strict=True):
        img, txt = nag_double(block, img, txt, img_mods, txt_mods, pe, pe_negative, pads, nag)
    stream = torch.cat((txt, torch.cat((img, img[-bn:]))), 1)
    for block, mod in zip(model.single_blocks, single_mods, strict=True):
        stream = nag_single(block, stream, mod, pe, pe_negative, txt.shape[1], bn, pads, nag)
    out = model.final_layer(stream[:-bn, txt.shape[1] :], final)[:, :img_tokens]
    image = rearrange(out, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=(h + 1) // 2, w=(w + 1) // 2, ph=2, pw=2)[:, :, :h, :w]
    return image.to(dtype)
