"""An independent reference of NAG on Wan 2.1/2.2, written from the authors' ComfyUI-NAG
(ChenDarYen/ComfyUI-NAG @ ef8a641: wan/model.py ``NAGWanModel.forward`` and ``forward_orig``,
``NAGWanT2VCrossAttention`` and ``NAGWanI2VCrossAttention``; utils.py ``nag`` and ``cat_context``): the NAG
rows are appended to the context batch before the model's ``text_embedding``; in every block's
cross-attention all context rows are projected (``norm_k(k(·))``, ``v(·)``), the query rows attend over
the batch's own context, the last rows' queries also over the NAG rows', and the last rows' attention
output is guided before ``o``. It runs a float64 copy of a stand-in model whose last
``len(nag_context)`` rows are the positive ones (the ComfyUI layout), with plain softmax attention.

Both contexts are brought to one length by repeating them (the padding in front), and the padding is
cut before each attention, as in the authors' Flux path; their Wan code cuts ``[:, :, pad:]`` of 3-D
K/V, which is the channel axis (for Neo's contexts, all padded to 512 tokens, the pads are 0). For
image-to-video the text part is guided as theirs, and the image-context part is left unguided, as
issue 16 asks (the authors guide it too; ``guide_image=True`` gives theirs).

``reference_cross_attention_model`` is the shared frame (copy, NAG rows appended, each cross-attention
replaced); ``tests/reference_anima.py`` uses it with Anima's cross-attention."""

import copy

import torch
from reference import reference_attention, reference_nag
from reference_joint import cat_context


def reference_cross_attention_model(model, nag_forward, nag_context, call, context_name="context"):
    """``call(model, context)`` on a float64 copy of ``model`` whose every ``.cross_attn`` runs
    ``nag_forward(module, n, pads)`` (n: the NAG rows, the last ``n`` of its context), with
    ``call``'s context: the batch's, then the NAG rows, at one length (``cat_context``)."""
    model = copy.deepcopy(model).double()

    def run(context):
        context, *pads = cat_context(context.double(), nag_context.double())
        for name, module in model.named_modules():
            if name.endswith(".cross_attn"):
                module.forward = nag_forward(module, len(nag_context), pads)
        return call(model, context)

    return run


def split(t, n, pads):
    """The batch's rows and the NAG rows of a projected context, each without its padding."""
    return t[:-n, pads[0] :], t[-n:, pads[1] :]


def wan_nag_forward(nag, guide_image=False):
    """The authors' NAG cross-attention (T2V; I2V's image part unguided unless ``guide_image``)."""

    def for_module(module, n, pads):
        heads = module.num_heads

        def guided(q, k, v, pads_of):
            (k, k_negative), (v, v_negative) = split(k, n, pads_of), split(v, n, pads_of)
            out = reference_attention(q, k, v, heads)
            negative = reference_attention(q[-n:], k_negative, v_negative, heads)
            return torch.cat([out[:-n], reference_nag(out[-n:], negative, *nag)])

        def forward(x, context, context_img_len=None, **_kwargs):
            q = module.norm_q(module.q(x))
            if not hasattr(module, "k_img"):
                return module.o(guided(q, module.norm_k(module.k(context)), module.v(context), pads))
            context_img, context = context[:, :context_img_len], context[:, context_img_len:]
            text = guided(q, module.norm_k(module.k(context)), module.v(context), pads)
            k_img, v_img = module.norm_k_img(module.k_img(context_img)), module.v_img(context_img)
            if guide_image:
                image = guided(q, k_img, v_img, pads)
            else:
                image = reference_attention(q, k_img[:-n, pads[0] :], v_img[:-n, pads[0] :], heads)
            return module.o(text + image)

        return forward

    return for_module


def reference_wan(model, x, timestep, context, nag_context, nag, guide_image=False, **kwargs):
    """The Wan model's output with NAG on the last ``len(nag_context)`` rows, in float64 (returned in
    x's dtype). ``nag`` is (scale, tau, alpha); ``kwargs`` go to the model's forward."""

    def call(model, context):
        return model(x.double(), timestep.double(), context=context, **kwargs)

    return reference_cross_attention_model(model, wan_nag_forward(nag, guide_image), nag_context, call)(context).to(x.dtype)
