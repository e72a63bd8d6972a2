"""An independent NAG reference, written from the published formula (authors' code form),
computed in float64 with plain softmax attention."""

import torch


def reference_nag(z_positive, z_negative, scale, tau, alpha):
    zp, zn = z_positive.double(), z_negative.double()
    guided = zp * scale - zn * (scale - 1)
    norm_positive = torch.norm(zp, p=1, dim=-1, keepdim=True)
    norm_guided = torch.norm(guided, p=1, dim=-1, keepdim=True)
    ratio = norm_guided / norm_positive
    guided = guided * torch.minimum(ratio, ratio.new_ones(1) * tau) / ratio
    return guided * alpha + zp * (1 - alpha)


def reference_attention(q, k, v, heads):
    """softmax(q·kᵀ/√d)·v per head, float64, heads merged back."""
    q, k, v = (t.double() for t in (q, k, v))
    b, n, inner = q.shape
    d = inner // heads
    qh = q.reshape(b, n, heads, d).transpose(1, 2)
    kh = k.reshape(b, k.shape[1], heads, d).transpose(1, 2)
    vh = v.reshape(b, v.shape[1], heads, d).transpose(1, 2)
    weights = (qh @ kh.transpose(-1, -2) / d**0.5).softmax(dim=-1)
    return (weights @ vh).transpose(1, 2).reshape(b, n, inner)


def reference_guided_rows(module, x, context, rows, negatives, scale, tau, alpha):
    """to_out(NAG(attn(q, K⁺, V⁺), attn(q, K⁻, V⁻))) for the given rows; ``negatives[i]`` is
    the NAG-negative context ``[1, T⁻, C]`` of ``rows[i]``."""
    out = []
    for row, negative in zip(rows, negatives, strict=True):
        q = module.to_q(x[row : row + 1])
        z_positive = reference_attention(q, module.to_k(context[row : row + 1]), module.to_v(context[row : row + 1]), module.heads)
        z_negative = reference_attention(q, module.to_k(negative), module.to_v(negative), module.heads)
        guided = reference_nag(z_positive, z_negative, scale, tau, alpha)
        out.append(module.to_out(guided.to(x.dtype)))
    return torch.cat(out)
