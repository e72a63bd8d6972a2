"""Forge's SD UNet attention path (backend/nn/unet.py, main dfdcbab6), run on real ``ldm`` UNets
(see README.md): ``BasicTransformerBlock._forward``'s attn2 step and ``CrossAttention.forward``."""

import contextlib

from backend.attention import attention_function
from ldm.modules.attention import BasicTransformerBlock, CrossAttention


def block_key(name):
    """Mirrors the (block, block_index) that IntegratedUNet2DConditionModel.forward and
    SpatialTransformer.forward set for a block named like ``input_blocks.4.1.transformer_blocks.0``."""
    parts = name.split(".")
    if parts[0] == "middle_block":
        return ("middle", 0), int(parts[3])
    return ("input" if parts[0] == "input_blocks" else "output", int(parts[1])), int(parts[4])


def cross_attention_forward(self, x, context=None, value=None, mask=None, transformer_options={}):  # noqa: B006 (Forge's signature)
    """Mirrors backend/nn/unet.py CrossAttention.forward: every projection is a module call."""
    q = self.to_q(x)
    context = x if context is None else context
    k = self.to_k(context)
    v = self.to_v(value) if value is not None else self.to_v(context)
    return self.to_out(attention_function(q, k, v, self.heads, mask))


def attn2_step(block, x, context, transformer_options):
    """Mirrors the attn2 step of BasicTransformerBlock._forward: ``extra_options`` (the options
    without patches, plus n_heads/dim_head); with an ``attn2_patch`` list, value = context and each
    patch maps ``(n, context, value, extra_options)``; then a replace found under the 3-tuple key,
    else the 2-tuple block key, gets projected q/k/v (module calls) and returns the output before
    ``to_out``; without one, the module itself is called."""
    attn2 = block.attn2
    extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
    extra_options.update(n_heads=attn2.heads, dim_head=attn2.to_q.out_features // attn2.heads)
    n, context_attn2, value_attn2 = block.norm2(x), context, None
    patches = transformer_options.get("patches", {})
    if "attn2_patch" in patches:
        value_attn2 = context_attn2
        for patch in patches["attn2_patch"]:
            n, context_attn2, value_attn2 = patch(n, context_attn2, value_attn2, extra_options)
    replaces = transformer_options.get("patches_replace", {}).get("attn2", {})
    key = extra_options["block"]
    replace = replaces.get((key[0], key[1], extra_options["block_index"])) or replaces.get(key)
    if replace is not None:
        value_attn2 = context_attn2 if value_attn2 is None else value_attn2
        q, k, v = attn2.to_q(n), attn2.to_k(context_attn2), attn2.to_v(value_attn2)
        return attn2.to_out(replace(q, k, v, extra_options))
    return attn2(n, context=context_attn2, value=value_attn2, transformer_options=extra_options)


@contextlib.contextmanager
def forge_attention(unet, call_options_for):
    """Run ``unet`` (an ldm UNet) with Forge's attention path; ``call_options_for()`` gives the
    transformer options of the current call (the patcher's, plus ``cond_or_uncond`` and ``sigmas``
    as Forge's sampling function adds them)."""
    keys = {id(m): block_key(name) for name, m in unet.named_modules() if isinstance(m, BasicTransformerBlock)}

    def block_forward(self, x, context=None):
        block, index = keys[id(self)]
        options = {**call_options_for(), "block": block, "block_index": index}
        x = self.attn1(self.norm1(x), context=context if self.disable_self_attn else None) + x
        x = attn2_step(self, x, context, options) + x
        return self.ff(self.norm3(x)) + x

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(BasicTransformerBlock, "_forward", block_forward))
        stack.enter_context(_patched(CrossAttention, "forward", cross_attention_forward))
        yield


@contextlib.contextmanager
def _patched(cls, name, value):
    original = cls.__dict__[name]
    setattr(cls, name, value)
    try:
        yield
    finally:
        setattr(cls, name, original)


def run_unet_as_forge(patcher, x, timesteps, context, call_options, **kwargs):
    """One UNet call as Forge's sampling function makes it: the patcher's transformer options plus
    ``call_options`` (``cond_or_uncond``, ``sigmas``)."""
    unet = patcher.model.diffusion_model
    with forge_attention(unet, lambda: {**patcher.model_options["transformer_options"], **call_options}):
        return unet(x, timesteps, context=context, **kwargs)
