import copy


class UnetPatcher:
    """Mirrors backend/patcher/unet.py UnetPatcher (Forge 2): the model and its options."""

    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.object_patches, self.object_patches_backup = {}, {}

    def clone(self):
        """Mirrors UnetPatcher.clone: a new patcher over the same model, options deep-copied,
        object patches shallow-copied."""
        clone = UnetPatcher(self.model)
        clone.model_options = copy.deepcopy(self.model_options)
        clone.object_patches = self.object_patches.copy()
        return clone

    def add_object_patch(self, name, obj):
        """Mirrors ModelPatcher.add_object_patch: recorded, applied when the patcher is loaded."""
        self.object_patches[name] = obj

    def forge_patch_model(self):
        """Mirrors ModelPatcher.forge_patch_model (run by load_models_gpu before sampling): each
        dotted attribute set on the instance, what was there backed up once."""
        for name, obj in self.object_patches.items():
            owner, attribute = _owner(self.model, name)
            self.object_patches_backup.setdefault(name, getattr(owner, attribute))
            setattr(owner, attribute, obj)

    def forge_unpatch_model(self):
        """Mirrors ModelPatcher.forge_unpatch_model: the backed-up values set back (a bound method
        read from the class is set back as an instance attribute)."""
        for name, old in self.object_patches_backup.items():
            owner, attribute = _owner(self.model, name)
            setattr(owner, attribute, old)
        self.object_patches_backup = {}

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


def _owner(model, name):
    *path, attribute = name.split(".")
    for part in path:
        model = getattr(model, part)
    return model, attribute
