"""An independent float64 reference of NAG on Flux.2 (Forge Neo's Klein), derived from the authors'
Flux pattern, as they have no Flux.2 code (ChenDarYen/ComfyUI-NAG @ ef8a641: flux/model.py NAGFlux,
flux/layers.py NAGDoubleStreamBlock and NAGSingleStreamBlock, utils.py cat_context; the blocks are
``reference_joint``'s): the NAG rows are appended to the batch, both text contexts brought to one length
(the padding cut before each attention), and the single-stream blocks run the NAG rows as whole
``[NAG text; image]`` streams, the guided image output written into both rows. Flux.2 as Neo's
``backend/nn/flux.py`` builds it: global modulations of the time embedding (no pooled vector) for the
batch and, appended, the NAG rows (their positive rows' time); text ids ``0 … L−1`` on ``txt_ids_dims``
for each text at its own length; patches of 1; reference latents appended to the image tokens with
ids ``(10·k, row, column, 0)``, expanded to the batch, cut after the final layer."""

import copy

import torch
from backend.nn.flux import timestep_embedding
from reference_joint import cat_context, nag_double, nag_single, unpacked


def tokens_and_ids(x, index=0, axes=4):
    """Patches of 1: ``[B, H·W, C]`` tokens, ids ``(index, row, column, 0…)``."""
    batch, _, h, w = x.shape
    rows, columns = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    ids = torch.zeros(h, w, axes, dtype=x.dtype)
    ids[..., 0], ids[..., 1], ids[..., 2] = index, rows, columns
    return x.flatten(2).transpose(1, 2), ids.reshape(1, h * w, axes).repeat(batch, 1, 1)


def text_ids(model, rows, length):
    ids = torch.zeros(rows, length, len(model.axes_dim), dtype=torch.float64)
    for axis in model.txt_ids_dims:
        ids[..., axis] = torch.arange(length)
    return ids


def reference_flux2(model, x, timestep, context, nag_context, nag, refs=(), guidance=None):
    """The model's output with NAG on the last ``len(nag_context)`` rows, in float64 (returned as x's
    dtype). ``nag`` is (scale, tau, alpha); ``refs`` the reference latents (batch 1); ``timestep`` the
    one the blocks embed."""
    model = copy.deepcopy(model).double()
    dtype, (x, timestep, context, nag_context) = x.dtype, (t.double() for t in (x, timestep, context, nag_context))
    bn, (h, w) = len(nag_context), x.shape[2:]
    img, img_ids = tokens_and_ids(x)
    img_tokens = img.shape[1]
    for k, ref in enumerate(refs, start=1):
        ref_tokens, ref_ids = tokens_and_ids(ref.double(), index=k * model.ref_index_scale)
        img, img_ids = torch.cat((img, ref_tokens.expand(len(x), -1, -1)), 1), torch.cat((img_ids, ref_ids.expand(len(x), -1, -1)), 1)
    txt, *pads = cat_context(context, nag_context)
    img = model.img_in(img)
    pe = model.pe_embedder(torch.cat((text_ids(model, len(x), context.shape[1]), img_ids), 1)).double()
    pe_negative = model.pe_embedder(torch.cat((text_ids(model, bn, nag_context.shape[1]), img_ids[-bn:]), 1)).double()
    txt = model.txt_in(txt if model.txt_norm is None else model.txt_norm(txt))
    vec = model.time_in(timestep_embedding(timestep, 256))
    if model.guidance_embed and guidance is not None:
        vec = vec + model.guidance_in(timestep_embedding(guidance.double(), 256))
    with_nag_rows = torch.cat((vec, vec[-bn:]))
    img_mods = unpacked(model.double_stream_modulation_img(vec))
    txt_mods = unpacked(model.double_stream_modulation_txt(with_nag_rows))
    single_mod = unpacked(model.single_stream_modulation(with_nag_rows))[0]
    for block in model.double_blocks:
        img, txt = nag_double(block, img, txt, img_mods, txt_mods, pe, pe_negative, pads, nag)
    stream = torch.cat((txt, torch.cat((img, img[-bn:]))), 1)
    for block in model.single_blocks:
        stream = nag_single(block, stream, single_mod, pe, pe_negative, txt.shape[1], bn, pads, nag)
    out = model.final_layer(stream[:-bn, txt.shape[1] :], vec)[:, :img_tokens]
    return out.transpose(1, 2).reshape(len(x), -1, h, w).to(dtype)
