import torch.nn.functional as F


def attention_function(q, k, v, heads, mask=None, skip_reshape=False, **kwargs):
    """Mirrors backend/attention.py attention_pytorch (Forge 2; Neo's also takes and ignores other
    keywords such as ``transformer_options``): heads split (already split with ``skip_reshape``:
    ``[batch, heads, tokens, head_dim]``), SDPA, heads merged."""
    if not skip_reshape:
        batch, _, inner = q.shape
        q, k, v = (t.view(batch, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    batch, _, _, head_dim = out.shape
    return out.transpose(1, 2).reshape(batch, -1, heads * head_dim)
