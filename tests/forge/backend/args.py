"""Stand-in of Forge Neo's ``backend/args.py``: only ``dynamic_args``, the process-global settings
models read their extra inputs from: Flux Kontext's reference latents (``dynamic_args.get("ref_latents")``),
Anima's (``dynamic_args.ref_latents``) and Wan 2.2 I2V's concatenated latent
(``dynamic_args.concat_latent``). Neo's is a class whose metaclass gives item access too; here a
dict with attribute access, and Neo's defaults for what is not set."""

_DEFAULTS = {"ref_latents": list, "concat_latent": lambda: None}


class _DynamicArgs(dict):
    def __getattr__(self, name):
        if name in self:
            return self[name]
        if name in _DEFAULTS:
            return _DEFAULTS[name]()
        raise AttributeError(name)

    def __setattr__(self, name, value):
        self[name] = value


dynamic_args = _DynamicArgs()
