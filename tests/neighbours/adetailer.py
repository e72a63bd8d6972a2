"""ADetailer (Bing-su/adetailer ``36189cbe``, ``scripts/!adetailer.py`` ``postprocess_image``,
``script_filter``, ``get_i2i_p``), reduced to one inpaint pass per image. Kept: from
``postprocess_image`` (after the outer job's sampling, before its ``postprocess``) it runs an
img2img job with ``process_images`` on a copy of the script runner whose alwayson scripts are
filtered to an allowlist by file stem (NAG's is not on it by default), the script arguments copied in
place, and ``_ad_inner`` set on the inner ``p``."""

from copy import copy
from pathlib import Path

from modules import processing, scripts

ALLOWLIST = ("dynamic_prompting", "dynamic_thresholding", "wildcards", "soft_inpainting")


class ADetailer(scripts.Script):
    def __init__(self):
        self.inner_jobs = []

    def title(self):
        return "ADetailer"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def postprocess_image(self, p, pp, *args):
        if getattr(p, "_ad_inner", False):
            return
        runner = copy(p.scripts)
        runner.alwayson_scripts = [s for s in p.scripts.alwayson_scripts if Path(s.filename).stem in ALLOWLIST]
        inner = processing.StableDiffusionProcessingImg2Img(
            prompt=p.prompts[0], negative_prompt=p.negative_prompts[0], steps=2, width=p.width, height=p.height,
            sampler_name=p.sampler_name, seed=p.seeds[0], denoising_strength=0.4, init_latent=pp.image[None].clone(),
        )
        inner.scripts, inner.script_args, inner._ad_inner = runner, [copy(a) for a in p.script_args], True
        self.inner_jobs.append(processing.process_images(inner))
