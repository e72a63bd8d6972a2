"""Mirrors modules/models/sd3/other_impls.py of A1111 v1.10.1 (82a973c0): the two pieces mmdit.py
imports, written from their behaviour."""

import torch
from torch import nn


def attention(q, k, v, heads, mask=None):
    """PyTorch SDPA on ``[B, L, H·Dh]`` tensors (viewed as ``[B, H, L, Dh]``), heads merged back."""
    batch, _, inner = q.shape
    q, k, v = (t.view(batch, -1, heads, inner // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(batch, -1, inner)


class Mlp(nn.Module):
    """``fc1`` → activation → ``fc2``."""

    def __init__(self, in_features, hidden_features, act_layer):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = act_layer
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))
