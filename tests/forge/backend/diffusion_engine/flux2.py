"""Mirrors the prompt side of Forge Neo's ``backend/diffusion_engine/flux2.py`` (class ``Flux2``, Flux.2
Klein; read in the Neo v3.5 copy exo101/sd-webui-forge-neo-v3 @ 5692d2d1): ``get_learned_conditioning``
sets ``dynamic_args["ref_latents"]`` again for a prompt that is not a negative one, to the stored
references (``ref_latents``) after the img2img image's latent (``ini_latent``), which it consumes. The
text engine (Qwen3 with the chat template, padded to 512 tokens) is the ``encode`` given; Neo's memory
management is left out (and Haoming02's later ``opts.klein_do_reference`` switch)."""

from backend.diffusion_engine.flux_neo import set_references


class Flux2:
    def __init__(self, encode):
        self.encode = encode  # texts → the context [B, L, 3·hidden]
        self.ini_latent = None  # ForgeDiffusionEngine: the img2img image's latent
        self.ref_latents = []  # ForgeDiffusionEngine: the reference images' latents

    def get_learned_conditioning(self, prompt):
        if not prompt.is_negative_prompt:
            set_references(self)
        return self.encode(prompt)
