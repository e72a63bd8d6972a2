"""ControlNet's IP-Adapter for A1111 (Mikubill/sd-webui-controlnet ``56cec5b2``,
``scripts/ipadapter/plugable_ipadapter.py`` ``hack_blk``/``attn_forward_hacked``/
``clear_all_ip_adapter``), reduced to one fixed image embedding. Kept: in ``process`` it first
restores every block it hacked, then, per ``attn2``, saves whatever ``forward`` is there (an
instance forward included) and sets its own instance forward, which reimplements the attention
(SDPA), adds the image attention to the output *before* ``to_out`` and calls ``to_out``; restoring
assigns the saved forward back as an instance attribute (``k.forward = v``), in ``process`` and
``postprocess``."""

import torch
import torch.nn.functional as F
from modules import scripts

all_hacks = {}


def attn_forward_hacked(self, x, context=None, **kwargs):
    batch, _tokens, inner = x.shape
    heads, head_dim = self.heads, inner // self.heads
    q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, -1, inner)
    for hack in self.ipadapter_hacks:
        out = out + hack(self, x, q)
    return self.to_out(out)


def hack_blk(block, function):
    if not hasattr(block, "ipadapter_hacks"):
        block.ipadapter_hacks = []
    if len(block.ipadapter_hacks) == 0:
        all_hacks[block] = block.forward
        block.forward = attn_forward_hacked.__get__(block, type(block))
    block.ipadapter_hacks.append(function)


def clear_all_ip_adapter():
    for block, forward in all_hacks.items():
        block.forward = forward
        block.ipadapter_hacks = []
    all_hacks.clear()


def image_attention(image_tokens, weight):
    """The IP term: the query heads attend over the image embedding's own K/V."""

    def attend(block, x, q):
        k = v = block.to_k(image_tokens.to(x.dtype)).expand(x.shape[0], -1, -1)
        k, v = (t.view(x.shape[0], -1, block.heads, q.shape[-1]).transpose(1, 2) for t in (k, v))
        return weight * F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], -1, block.heads * q.shape[-1])

    return attend


class ControlNetIPAdapter(scripts.Script):
    def title(self):
        return "ControlNet"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        clear_all_ip_adapter()
        unet = p.sd_model.model.diffusion_model
        context_dim = unet.input_blocks[1][1].transformer_blocks[0].attn2.to_k.in_features
        image_tokens = torch.randn(1, 4, context_dim, generator=torch.Generator().manual_seed(7))
        for name, module in unet.named_modules():
            if name.endswith(".attn2"):
                hack_blk(module, image_attention(image_tokens, 0.8))

    def postprocess(self, p, processed, *args):
        clear_all_ip_adapter()
