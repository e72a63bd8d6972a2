"""Regional Prompter's attention mode (hako-mikan/sd-webui-regional-prompter ``be623452``,
``scripts/attention.py`` ``hook_forwards``/``hook_forward``/``main_forward``, ``scripts/rp.py``),
reduced to Matrix mode, columns, equal ratios, with the prompt's and the negative's BREAK chunks as
regions. What matters for a neighbour is kept: an instance ``forward`` on every ``attn2`` whose class
is named ``CrossAttention``, installed in ``process`` (and again in ``process_before_every_sampling``
on Forge) and removed with ``del module.forward``; a forward that reimplements the attention (einsum,
``heads // 2`` on the cond/uncond halves) and runs ``to_q → to_k → to_v → to_out`` once per region
on ``x.chunk(2)`` (cond first on A1111's k-diffusion samplers, uncond first on Forge)."""

import torch
from einops import rearrange
from modules import scripts

TOKENS = 77


def main_forward(module, x, context, divide):
    """Mirrors main_forward: one region's attention, through to_out."""
    heads = module.heads // divide
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    q, k, v = (rearrange(t, "b n (h d) -> (b h) n d", h=heads) for t in (q, k, v))
    attention = (torch.einsum("b i d, b j d -> b i j", q, k) * module.scale).softmax(dim=-1)
    out = rearrange(torch.einsum("b i j, b j d -> b i d", attention, v), "(b h) n d -> b n (h d)", h=heads)
    return module.to_out(out)


def matrix_columns(module, x, contexts, regions):
    """Mirrors matsepcalc for Matrix/Columns: region i's output fills column band i of the image."""
    side = int(x.shape[1] ** 0.5)
    bands = []
    for i in range(regions):
        out = main_forward(module, x, contexts[:, i * TOKENS : (i + 1) * TOKENS], divide=2)
        out = out.reshape(out.shape[0], side, side, out.shape[-1])
        width = side // regions
        bands.append(out[:, :, i * width : (i + 1) * width])
    return torch.cat(bands, dim=2).reshape(x.shape[0], side * side, -1)


def hook_forward(module, regions, uncond_first):
    def forward(x, context=None, mask=None, additional_tokens=None, n_times_crossframe_attn_in_self=0, value=None, transformer_options=None):  # noqa: E501
        if uncond_first:
            nx, px = x.chunk(2)
            conn, conp = context.chunk(2)
        else:
            px, nx = x.chunk(2)
            conp, conn = context.chunk(2)
        opx, onx = matrix_columns(module, px, conp, regions), matrix_columns(module, nx, conn, regions)
        return torch.cat([onx, opx]) if uncond_first else torch.cat([opx, onx])

    return forward


def hook_forwards(root, regions=2, uncond_first=False, remove=False):
    """Mirrors hook_forwards: assign to every matching attn2, and ``del`` to remove."""
    for name, module in root.named_modules():
        if "attn2" in name and module.__class__.__name__ == "CrossAttention":
            module.forward = hook_forward(module, regions, uncond_first)
            if remove:
                del module.forward


class RegionalPrompter(scripts.Script):
    """The A1111 script: hooks in ``process``, unhooks in ``postprocess``."""

    def title(self):
        return "Regional Prompter"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        hook_forwards(p.sd_model.model.diffusion_model)

    def postprocess(self, p, processed, *args):
        hook_forwards(p.sd_model.model.diffusion_model, remove=True)


def latent_mode_callback(areas):
    """Mirrors latent.py denoiser_callback_s on A1111: the cond rows of ``params.x`` and
    ``params.text_cond`` (image-major: each image's AND areas) reordered in place, area-major."""

    def reorder(params):
        cond = params.text_cond.shape[0]
        images = cond // areas
        order = [image * areas + area for area in range(areas) for image in range(images)]
        for tensor in (params.x, params.text_cond):
            tensor[:cond] = tensor[order].clone()

    return reorder
