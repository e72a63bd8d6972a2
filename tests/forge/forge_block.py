"""The attn2 half of Forge's ``BasicTransformerBlock._forward`` (backend/nn/unet.py), run on
real ``ldm`` CrossAttention modules (see README.md)."""


def block_key(name):
    """Mirrors the (block, block_index) that IntegratedUNet2DConditionModel.forward and
    SpatialTransformer.forward set for a module named like ``input_blocks.4.1.transformer_blocks.0.attn2``."""
    parts = name.split(".")
    if parts[0] == "middle_block":
        return ("middle", 0), int(parts[3])
    return ("input" if parts[0] == "input_blocks" else "output", int(parts[1])), int(parts[4])


def forge_attn2(module, x, context, transformer_options, block, block_index):
    """Mirrors BasicTransformerBlock._forward's attn2 step: a registered replace gets projected
    q/k/v and returns the output before to_out; without one, the module runs."""
    extra_options = {k: v for k, v in transformer_options.items() if k not in ("patches", "patches_replace")}
    extra_options.update(block=block, block_index=block_index, n_heads=module.heads, dim_head=module.to_q.out_features // module.heads)
    replaces = transformer_options.get("patches_replace", {}).get("attn2", {})
    replace = replaces.get((block[0], block[1], block_index)) or replaces.get(block)
    if replace is None:
        return type(module).forward(module, x, context=context)
    q, k, v = module.to_q(x), module.to_k(context), module.to_v(context)
    return module.to_out(replace(q, k, v, extra_options))


def run_unet_as_forge(patcher, x, timesteps, context, call_options, **kwargs):
    """Run the patcher's ldm UNet with every attn2 going through ``forge_attn2``; ``call_options``
    are what Forge's sampling function adds per call (``cond_or_uncond``, ``sigmas``)."""
    unet = patcher.model.diffusion_model
    options = {**patcher.model_options["transformer_options"], **call_options}
    modules = [(name, m) for name, m in unet.named_modules() if name.endswith(".attn2")]
    for name, module in modules:
        block, index = block_key(name)
        module.forward = lambda x, context=None, m=module, b=block, i=index: forge_attn2(m, x, context, options, b, i)
    try:
        return unet(x, timesteps, context=context, **kwargs)
    finally:
        for _, module in modules:
            del module.forward
