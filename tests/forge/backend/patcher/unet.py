import copy


class UnetPatcher:
    """Mirrors backend/patcher/unet.py UnetPatcher (Forge 2): the model and its options."""

    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}

    def clone(self):
        """Mirrors UnetPatcher.clone: a new patcher over the same model, options deep-copied."""
        clone = UnetPatcher(self.model)
        clone.model_options = copy.deepcopy(self.model_options)
        return clone

    def set_model_attn2_patch(self, patch):
        """Mirrors ModelPatcher.set_model_attn2_patch / set_model_patch: a new list, copy-on-write."""
        options = dict(self.model_options["transformer_options"])
        patches = dict(options.get("patches", {}))
        patches["attn2_patch"] = [*patches.get("attn2_patch", []), patch]
        options["patches"] = patches
        self.model_options["transformer_options"] = options

    def set_model_attn2_replace(self, patch, block_name, number, transformer_index=None):
        """Mirrors ModelPatcher.set_model_attn2_replace / set_model_options_patch_replace."""
        key = (block_name, number) if transformer_index is None else (block_name, number, transformer_index)
        options = dict(self.model_options["transformer_options"])
        replaces = dict(options.get("patches_replace", {}))
        attn2 = dict(replaces.get("attn2", {}))
        attn2[key] = patch
        replaces["attn2"] = attn2
        options["patches_replace"] = replaces
        self.model_options["transformer_options"] = options
