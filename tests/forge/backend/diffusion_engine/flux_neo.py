"""Mirrors the prompt side of Forge Neo's ``backend/diffusion_engine/flux.py`` (class ``Flux``; read in
Haoming02/sd-webui-forge-classic neo @ 0b824fed and in the Neo v3.5 copy exo101/sd-webui-forge-neo-v3 @
5692d2d1, the same there): ``get_learned_conditioning``'s Kontext bookkeeping. For a prompt that is not
a negative one it sets ``dynamic_args["ref_latents"]`` again: with Kontext on, to the stored
references (``ref_latents``, ImageStitch) after the img2img image's latent (``ini_latent``), which it
consumes; with Kontext off, it clears them. The text encoders (CLIP-L's pooled vector, T5) are the
``encode`` given; Neo's memory management is left out."""

import torch

from backend.args import dynamic_args


class Flux:
    def __init__(self, encode, use_distilled_cfg_scale=True):
        self.encode = encode  # texts → (T5 context [B, L, C], pooled CLIP-L vector [B, P])
        self.use_distilled_cfg_scale = use_distilled_cfg_scale
        self.ini_latent = None  # ForgeDiffusionEngine: the img2img image's latent
        self.ref_latents = []  # ForgeDiffusionEngine: the reference images' latents

    def get_learned_conditioning(self, prompt):
        cond_t5, pooled_l = self.encode(prompt)
        cond = {"crossattn": cond_t5, "vector": pooled_l}
        if self.use_distilled_cfg_scale:
            cond["guidance"] = torch.FloatTensor([getattr(prompt, "distilled_cfg_scale", 3.0) or 3.0] * len(prompt))
        if not prompt.is_negative_prompt:
            if not dynamic_args.get("kontext"):
                dynamic_args.setdefault("ref_latents", []).clear()
            else:
                set_references(self)
        return cond


def set_references(engine):
    """Neo's engines (Flux, Flux2) write this inline: the references for the prompt are the stored ones
    after the img2img latent, which is consumed."""
    references = [*engine.ref_latents]
    if engine.ini_latent is not None:
        references.insert(0, engine.ini_latent)
        engine.ini_latent = None
    dynamic_args["ref_latents"] = references.copy()
