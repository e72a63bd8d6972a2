"""Mirrors backend/nn/wan.py of Forge Neo (read in the copy exo101/sd-webui-forge-neo-v3 @
5692d2d1e6c293faf5486f7cb18c27c9a3faa758, ``webui/backend/nn/wan.py``; Neo's port of ComfyUI v0.3.64
comfy/ldm/wan/model.py): Wan 2.1 / 2.2 text-to-video and image-to-video, the same class, attribute and
argument names and order of operations, written from its behaviour. Sizes are constructor arguments.

Mirrored: the module-level ``attention`` wrapper (self-attention calls it, the cross-attentions call
``attention_function`` directly); ``WanSelfAttention`` (``q``/``k``/``v``/``o``, ``norm_q``/``norm_k``
RMSNorm over the whole width before the head split, RoPE by ``apply_rope1``); ``WanT2VCrossAttention``;
``WanI2VCrossAttention`` (``k_img``/``v_img``/``norm_k_img``; the context split at ``context_img_len``,
the image attention first, then the text attention, summed before ``o``); ``WanAttentionBlock`` (the
6-vector modulation, cross-attention on ``norm3(x)`` without modulation or gate, called with
``context_img_len`` and no ``transformer_options``); ``Head``; ``MLPProj``; ``WanModel.forward`` (Wan
2.2 I2V's ``dynamic_args.concat_latent`` on the channel axis, doubled only for a 2-row batch; padding
to the patch size; 3-D position ids; ``time_dim_concat``) and ``forward_orig`` (the context through
``text_embedding`` once per call; ``clip_fea`` through ``img_emb`` before the text; ``dit``
``("double_block", i)`` replace patches; ``transformer_options`` ``total_blocks``/``block_type``/
``block_index``). ``apply_rope1`` is ComfyUI-kitchen's, which Neo's flux.py re-exports; ``EmbedND``
is the Forge main stand-in's (the same rotation matrices).

Left out: ``cast_to_device``'s offload (a plain cast here); ``MLPProj``'s input width is a constructor
argument (``clip_dim``, 1280 in Neo) so that tests stay small.
"""

import math

import torch
from einops import repeat
from torch import nn

from backend import args
from backend.attention import attention_function
from backend.memory_management import cast_to_device
from backend.nn.flux import EmbedND
from backend.utils import pad_to_patch_size


def attention(*args, **kwargs):  # the hook point Radial-Attention-style extensions replace
    return attention_function(*args, **kwargs)


def apply_rope1(x, freqs_cis):
    """One tensor ``[B, L, H, Dh]`` rotated by ``freqs_cis`` ``[B, L, 1, Dh/2, 2, 2]`` (in its dtype)."""
    pairs = x.to(freqs_cis.dtype).reshape(*x.shape[:-1], -1, 1, 2)
    return (freqs_cis[..., 0] * pairs[..., 0] + freqs_cis[..., 1] * pairs[..., 1]).reshape(*x.shape).type_as(x)


def sinusoidal_embedding_1d(dim, position):
    half = dim // 2
    position = position.type(torch.float32)
    angles = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads, window_size=(-1, -1), qk_norm=True, eps=1e-6):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.window_size = window_size
        self.qk_norm = qk_norm
        self.eps = eps
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()
        self.norm_k = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x, freqs, transformer_options={}):  # noqa: B006 (Neo's signature)
        b, s, n, d = *x.shape[:2], self.num_heads, self.head_dim
        q = apply_rope1(self.norm_q(self.q(x)).view(b, s, n, d), freqs)
        k = apply_rope1(self.norm_k(self.k(x)).view(b, s, n, d), freqs)
        x = attention(
            q.view(b, s, n * d),
            k.view(b, s, n * d),
            self.v(x).view(b, s, n * d),
            heads=self.num_heads,
            transformer_options=transformer_options,
        )
        return self.o(x)


class WanT2VCrossAttention(WanSelfAttention):
    def forward(self, x, context, **kwargs):
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        v = self.v(context)
        x = attention_function(q, k, v, heads=self.num_heads)
        return self.o(x)


class WanI2VCrossAttention(WanSelfAttention):
    def __init__(self, dim, num_heads, window_size=(-1, -1), qk_norm=True, eps=1e-6):
        super().__init__(dim, num_heads, window_size, qk_norm, eps)
        self.k_img = nn.Linear(dim, dim)
        self.v_img = nn.Linear(dim, dim)
        self.norm_k_img = nn.RMSNorm(dim, eps=eps) if qk_norm else nn.Identity()

    def forward(self, x, context, context_img_len):
        # Without CLIP-vision features ``context_img_len`` is None: both parts are the whole text context.
        context_img = context[:, :context_img_len]
        context = context[:, context_img_len:]
        q = self.norm_q(self.q(x))
        k = self.norm_k(self.k(context))
        v = self.v(context)
        k_img = self.norm_k_img(self.k_img(context_img))
        v_img = self.v_img(context_img)
        img_x = attention_function(q, k_img, v_img, heads=self.num_heads)
        x = attention_function(q, k, v, heads=self.num_heads)
        x = x + img_x
        return self.o(x)


WAN_CROSSATTENTION_CLASSES = {"t2v_cross_attn": WanT2VCrossAttention, "i2v_cross_attn": WanI2VCrossAttention}


def repeat_e(e, x):
    """A per-frame modulation repeated over the frame's tokens (a per-call one as it is)."""
    repeats = x.shape[1] // e.shape[1] if e.shape[1] > 1 else 1
    return e if repeats == 1 else torch.repeat_interleave(e, repeats, dim=1)


class WanAttentionBlock(nn.Module):
    def __init__(self, cross_attn_type, dim, ffn_dim, num_heads, window_size=(-1, -1), qk_norm=True, cross_attn_norm=False, eps=1e-6):
        super().__init__()
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps
        self.norm1 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.self_attn = WanSelfAttention(dim, num_heads, window_size, qk_norm, eps)
        self.norm3 = nn.LayerNorm(dim, eps, elementwise_affine=True) if cross_attn_norm else nn.Identity()
        self.cross_attn = WAN_CROSSATTENTION_CLASSES[cross_attn_type](dim, num_heads, (-1, -1), qk_norm, eps)
        self.norm2 = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(ffn_dim, dim))
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))

    def forward(self, x, e, freqs, context, context_img_len=257, transformer_options={}):  # noqa: B006
        modulation = cast_to_device(self.modulation, dtype=x.dtype, device=x.device)
        e = (modulation + e).chunk(6, dim=1) if e.ndim < 4 else (modulation.unsqueeze(0) + e).unbind(2)
        y = self.self_attn(self.norm1(x) * (1 + repeat_e(e[1], x)) + repeat_e(e[0], x), freqs, transformer_options=transformer_options)
        x = x + y * repeat_e(e[2], x)
        x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len)
        y = self.ffn(self.norm2(x) * (1 + repeat_e(e[4], x)) + repeat_e(e[3], x))
        return x + y * repeat_e(e[5], x)


class Head(nn.Module):
    def __init__(self, dim, out_dim, patch_size, eps=1e-6):
        super().__init__()
        self.dim = dim
        self.out_dim = out_dim
        self.patch_size = patch_size
        self.eps = eps
        self.norm = nn.LayerNorm(dim, eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(patch_size) * out_dim)
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))

    def forward(self, x, e):
        modulation = cast_to_device(self.modulation, dtype=x.dtype, device=x.device)
        e = (modulation + e.unsqueeze(1)).chunk(2, dim=1) if e.ndim < 3 else (modulation.unsqueeze(0) + e.unsqueeze(2)).unbind(2)
        return self.head(self.norm(x) * (1 + repeat_e(e[1], x)) + repeat_e(e[0], x))


class MLPProj(nn.Module):
    def __init__(self, in_dim, out_dim, flf_pos_embed_token_number=None):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(in_dim), nn.Linear(in_dim, in_dim), nn.GELU(), nn.Linear(in_dim, out_dim), nn.LayerNorm(out_dim)
        )
        self.emb_pos = None if flf_pos_embed_token_number is None else nn.Parameter(torch.empty((1, flf_pos_embed_token_number, in_dim)))

    def forward(self, image_embeds):
        if self.emb_pos is not None:
            position = cast_to_device(self.emb_pos[:, : image_embeds.shape[1]], dtype=image_embeds.dtype, device=image_embeds.device)
            image_embeds = image_embeds[:, : self.emb_pos.shape[1]] + position
        return self.proj(image_embeds)


class WanModel(nn.Module):
    def __init__(
        self,
        model_type="t2v",
        patch_size=(1, 2, 2),
        text_len=512,
        in_dim=16,
        dim=2048,
        ffn_dim=8192,
        freq_dim=256,
        text_dim=4096,
        out_dim=16,
        num_heads=16,
        num_layers=32,
        window_size=(-1, -1),
        qk_norm=True,
        cross_attn_norm=True,
        eps=1e-6,
        flf_pos_embed_token_number=None,
        clip_dim=1280,
    ):
        super().__init__()
        self.model_type = model_type
        self.patch_size = patch_size
        self.text_len = text_len
        self.in_dim = in_dim
        self.dim = dim
        self.ffn_dim = ffn_dim
        self.freq_dim = freq_dim
        self.text_dim = text_dim
        self.out_dim = out_dim
        self.num_heads = num_heads
        self.num_layers = num_layers
        self.window_size = window_size
        self.qk_norm = qk_norm
        self.cross_attn_norm = cross_attn_norm
        self.eps = eps
        self.patch_embedding = nn.Conv3d(in_dim, dim, kernel_size=patch_size, stride=patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(text_dim, dim), nn.GELU(approximate="tanh"), nn.Linear(dim, dim))
        self.time_embedding = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, dim * 6))
        cross_attn_type = "t2v_cross_attn" if model_type == "t2v" else "i2v_cross_attn"
        self.blocks = nn.ModuleList(
            [
                WanAttentionBlock(cross_attn_type, dim, ffn_dim, num_heads, window_size, qk_norm, cross_attn_norm, eps)
                for _ in range(num_layers)
            ]
        )
        self.head = Head(dim, out_dim, patch_size, eps)
        d = dim // num_heads
        self.rope_embedder = EmbedND(dim=d, theta=10000.0, axes_dim=[d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)])
        self.img_emb = MLPProj(clip_dim, dim, flf_pos_embed_token_number=flf_pos_embed_token_number) if model_type == "i2v" else None

    def forward_orig(self, x, t, context, clip_fea=None, freqs=None, transformer_options={}, **kwargs):  # noqa: B006
        x = self.patch_embedding(x).to(x.dtype)
        grid_sizes = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        e = self.time_embedding(sinusoidal_embedding_1d(self.freq_dim, t.flatten()).to(dtype=x[0].dtype))
        e = e.reshape(t.shape[0], -1, e.shape[-1])
        e0 = self.time_projection(e).unflatten(2, (6, self.dim))
        context = self.text_embedding(context)
        context_img_len = None
        if clip_fea is not None:
            if self.img_emb is not None:
                context = torch.concat([self.img_emb(clip_fea), context], dim=1)
            context_img_len = clip_fea.shape[-2]
        blocks_replace = transformer_options.get("patches_replace", {}).get("dit", {})
        transformer_options["total_blocks"] = len(self.blocks)
        transformer_options["block_type"] = "double"
        for i, block in enumerate(self.blocks):
            transformer_options["block_index"] = i
            if ("double_block", i) in blocks_replace:

                def block_wrap(args, block=block):
                    img = block(
                        args["img"],
                        context=args["txt"],
                        e=args["vec"],
                        freqs=args["pe"],
                        context_img_len=context_img_len,
                        transformer_options=args["transformer_options"],
                    )
                    return {"img": img}

                arguments = {"img": x, "txt": context, "vec": e0, "pe": freqs, "transformer_options": transformer_options}
                x = blocks_replace[("double_block", i)](arguments, {"original_block": block_wrap})["img"]
            else:
                x = block(x, e=e0, freqs=freqs, context=context, context_img_len=context_img_len, transformer_options=transformer_options)
        x = self.head(x, e)
        return self.unpatchify(x, grid_sizes)

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):  # noqa: B006
        _bs, c, t, h, w = x.shape
        if c < self.in_dim:
            concat = args.dynamic_args.concat_latent.to(x)
            if x.shape[0] == 2:  # batch_cond_uncond
                concat = torch.cat((concat, concat), dim=0)
            x = torch.cat((x, concat), dim=1)
        bs = x.shape[0]
        x = pad_to_patch_size(x, self.patch_size)
        p = self.patch_size
        t_len, h_len, w_len = ((size + (patch // 2)) // patch for size, patch in zip((t, h, w), p, strict=True))
        if time_dim_concat is not None:
            x = torch.cat([x, pad_to_patch_size(time_dim_concat, self.patch_size)], dim=2)
            t_len = (x.shape[2] + (p[0] // 2)) // p[0]
        img_ids = torch.zeros((t_len, h_len, w_len, 3), device=x.device, dtype=x.dtype)
        img_ids[..., 0] = img_ids[..., 0] + torch.linspace(0, t_len - 1, steps=t_len, device=x.device, dtype=x.dtype).reshape(-1, 1, 1)
        img_ids[..., 1] = img_ids[..., 1] + torch.linspace(0, h_len - 1, steps=h_len, device=x.device, dtype=x.dtype).reshape(1, -1, 1)
        img_ids[..., 2] = img_ids[..., 2] + torch.linspace(0, w_len - 1, steps=w_len, device=x.device, dtype=x.dtype).reshape(1, 1, -1)
        img_ids = repeat(img_ids, "t h w c -> b (t h w) c", b=bs)
        freqs = self.rope_embedder(img_ids).movedim(1, 2)
        out = self.forward_orig(x, timestep, context, clip_fea=clip_fea, freqs=freqs, transformer_options=transformer_options, **kwargs)
        return out[:, :, :t, :h, :w]

    def unpatchify(self, x, grid_sizes):
        c, b = self.out_dim, x.shape[0]
        u = x[:, : math.prod(grid_sizes)].view(b, *grid_sizes, *self.patch_size, c)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(b, c, *[i * j for i, j in zip(grid_sizes, self.patch_size, strict=True)])
