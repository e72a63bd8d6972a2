"""A reference of NAG on Anima's cross-attention. The authors' ComfyUI-NAG has no Anima code; this is
their Wan cross-attention rule (``tests/reference_wan.py``, from ComfyUI-NAG @ ef8a641 wan/model.py
``NAGWanT2VCrossAttention``) on Anima's ``SelfCrossAttention``: all context rows projected
(``k_norm``/``v_norm`` per head), the query rows (``q_norm`` per head) attend over the batch's own
context, the last rows' queries also over the NAG rows', and the last rows' attention output is guided
before ``output_proj``. Float64 copy of a stand-in model, positive rows last, plain softmax attention,
each context's padding cut before the attention."""

import torch
from reference import reference_attention, reference_nag
from reference_wan import reference_cross_attention_model, split


def anima_nag_forward(nag):
    def for_module(module, n, pads):
        heads = module.n_heads

        def per_head(norm, t):
            return norm(t.unflatten(-1, (heads, module.head_dim))).flatten(-2)

        def forward(x, context=None, rope_emb=None, transformer_options=None):
            q = per_head(module.q_norm, module.q_proj(x))
            k, k_negative = split(per_head(module.k_norm, module.k_proj(context)), n, pads)
            v, v_negative = split(per_head(module.v_norm, module.v_proj(context)), n, pads)
            out = reference_attention(q, k, v, heads)
            negative = reference_attention(q[-n:], k_negative, v_negative, heads)
            return module.output_dropout(module.output_proj(torch.cat([out[:-n], reference_nag(out[-n:], negative, *nag)])))

        return forward

    return for_module


def reference_anima(model, x, timesteps, context, nag_context, nag, **kwargs):
    """Anima's output with NAG on the last ``len(nag_context)`` rows, in float64 (returned in x's
    dtype); contexts ``[N, L, C]`` or Neo's ``[N, 1, L, C]``."""

    def call(model, context):
        return model(x.double(), timesteps.double(), context=context, **kwargs)

    run = reference_cross_attention_model(model, anima_nag_forward(nag), nag_context.flatten(1, -2), call)
    return run(context.flatten(1, -2)).to(x.dtype)
