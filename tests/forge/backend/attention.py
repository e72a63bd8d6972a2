import torch.nn.functional as F


def attention_function(q, k, v, heads, mask=None):
    """Mirrors backend/attention.py attention_pytorch (Forge 2): heads split, SDPA, merged."""
    batch, _, inner = q.shape
    head_dim = inner // heads
    q, k, v = (t.view(batch, -1, heads, head_dim).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return out.transpose(1, 2).reshape(batch, -1, inner)
