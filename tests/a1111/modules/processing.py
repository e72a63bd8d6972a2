"""Mirrors modules/processing.py (v1.10.1): processing objects, conds caching, the job loop and infotext.

Left out: VAE decode/encode (``Processed.images`` holds the final latents), styles, grids, saving,
face restore, subseeds, non-latent hires upscalers, inpainting-model conditioning and image masks
other than a latent-resolution tensor.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from modules import errors, extra_networks, infotext_utils, prompt_parser, rng, scripts, sd_models, sd_samplers, shared
from modules.shared import opts, state

opt_C, opt_f = 4, 8
VERSION = "v1.10.1"
JS_KEYS = (
    "prompt all_prompts negative_prompt all_negative_prompts seed all_seeds subseed all_subseeds subseed_strength width height"
    " sampler_name cfg_scale steps batch_size sd_model_name sd_model_hash denoising_strength extra_generation_params"
    " index_of_first_image infotexts styles job_timestamp clip_skip is_using_inpainting_conditioning version"
)


def txt2img_image_conditioning(sd_model, x, width, height):
    """Mirrors processing.txt2img_image_conditioning (v1.10.1); the hybrid case is a zero latent with a ones mask channel."""
    if sd_model.model.conditioning_key in {"hybrid", "concat"}:
        return torch.nn.functional.pad(x.new_zeros(x.shape[0], 4, height // opt_f, width // opt_f), (0, 0, 0, 0, 1, 0), value=1.0)
    return x.new_zeros(x.shape[0], 5, 1, 1)


@dataclass(repr=False)
class StableDiffusionProcessing:
    """Mirrors processing.StableDiffusionProcessing (v1.10.1)."""

    sd_model: object = None  # replaced by the property below, as in the host: always ``shared.sd_model``
    prompt: Any = ""
    negative_prompt: Any = ""
    styles: list = None
    seed: Any = -1
    subseed: int = -1
    subseed_strength: float = 0
    sampler_name: str = None
    scheduler: str = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    extra_generation_params: dict = None
    eta: float = None
    denoising_strength: float = None
    s_min_uncond: float = None
    s_churn: float = None
    s_tmax: float = None
    s_tmin: float = None
    s_noise: float = None
    override_settings: dict = None
    override_settings_restore_afterwards: bool = True
    refiner_checkpoint: str = None
    refiner_switch_at: float = None
    disable_extra_networks: bool = False

    scripts_value: Any = field(default=None, init=False)
    script_args_value: Any = field(default=None, init=False)
    scripts_setup_complete: bool = field(default=False, init=False)

    cached_uc: ClassVar[list] = [None, None]
    cached_c: ClassVar[list] = [None, None]

    sampler: Any = field(default=None, init=False)
    is_using_inpainting_conditioning: bool = field(default=False, init=False)
    is_hr_pass: bool = field(default=False, init=False)
    c: Any = field(default=None, init=False)
    uc: Any = field(default=None, init=False)
    rng: Any = field(default=None, init=False)
    step_multiplier: int = field(default=1, init=False)
    all_prompts: list = field(default=None, init=False)
    all_negative_prompts: list = field(default=None, init=False)
    all_seeds: list = field(default=None, init=False)
    all_subseeds: list = field(default=None, init=False)
    iteration: int = field(default=0, init=False)
    main_prompt: str = field(default=None, init=False)
    main_negative_prompt: str = field(default=None, init=False)
    prompts: list = field(default=None, init=False)
    negative_prompts: list = field(default=None, init=False)
    seeds: list = field(default=None, init=False)
    subseeds: list = field(default=None, init=False)
    extra_network_data: dict = field(default=None, init=False)
    sd_model_name: str = field(default=None, init=False)
    sd_model_hash: str = field(default=None, init=False)
    is_api: bool = field(default=False, init=False)

    def __post_init__(self):
        self.comments = {}
        self.styles = self.styles or []
        self.sampler_noise_scheduler_override = None
        self.extra_generation_params = self.extra_generation_params or {}
        self.override_settings = self.override_settings or {}
        self.script_args = self.script_args or {}
        self.refiner_checkpoint_info = None
        self.cached_uc = StableDiffusionProcessing.cached_uc
        self.cached_c = StableDiffusionProcessing.cached_c

    @property
    def sd_model(self):  # noqa: F811 (the host shadows its own field the same way)
        return shared.sd_model

    @sd_model.setter
    def sd_model(self, value):
        pass

    @property
    def scripts(self):
        return self.scripts_value

    @scripts.setter
    def scripts(self, value):
        self.scripts_value = value
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    @property
    def script_args(self):
        return self.script_args_value

    @script_args.setter
    def script_args(self, value):
        self.script_args_value = value
        if self.scripts_value and self.script_args_value and not self.scripts_setup_complete:
            self.setup_scripts()

    def setup_scripts(self):
        """Mirrors StableDiffusionProcessing.setup_scripts (v1.10.1)."""
        self.scripts_setup_complete = True
        self.scripts.setup_scrips(self, is_ui=not self.is_api)

    def comment(self, text):
        self.comments[text] = 1

    def fill_fields_from_opts(self):
        """Mirrors StableDiffusionProcessing.fill_fields_from_opts (v1.10.1)."""
        self.s_min_uncond = self.s_min_uncond if self.s_min_uncond is not None else opts.s_min_uncond
        self.s_churn = self.s_churn if self.s_churn is not None else opts.s_churn
        self.s_tmin = self.s_tmin if self.s_tmin is not None else opts.s_tmin
        self.s_tmax = (self.s_tmax if self.s_tmax is not None else opts.s_tmax) or float("inf")
        self.s_noise = self.s_noise if self.s_noise is not None else opts.s_noise

    def txt2img_image_conditioning(self, x, width=None, height=None):
        """Mirrors StableDiffusionProcessing.txt2img_image_conditioning (v1.10.1)."""
        self.is_using_inpainting_conditioning = self.sd_model.model.conditioning_key in {"hybrid", "concat"}
        return txt2img_image_conditioning(self.sd_model, x, width or self.width, height or self.height)

    def init(self, all_prompts, all_seeds, all_subseeds):
        pass

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        raise NotImplementedError()

    def close(self):
        """Mirrors StableDiffusionProcessing.close (v1.10.1)."""
        self.sampler = self.c = self.uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessing.cached_c = [None, None]
            StableDiffusionProcessing.cached_uc = [None, None]

    def get_token_merging_ratio(self, for_hr=False):
        return 0

    def setup_prompts(self):
        """Mirrors StableDiffusionProcessing.setup_prompts (v1.10.1) without styles."""
        if isinstance(self.prompt, list):
            self.all_prompts = self.prompt
        elif isinstance(self.negative_prompt, list):
            self.all_prompts = [self.prompt] * len(self.negative_prompt)
        else:
            self.all_prompts = self.batch_size * self.n_iter * [self.prompt]
        if isinstance(self.negative_prompt, list):
            self.all_negative_prompts = self.negative_prompt
        else:
            self.all_negative_prompts = [self.negative_prompt] * len(self.all_prompts)
        if len(self.all_prompts) != len(self.all_negative_prompts):
            raise RuntimeError(
                f"Received a different number of prompts ({len(self.all_prompts)}) and negative prompts ({len(self.all_negative_prompts)})"
            )
        self.main_prompt, self.main_negative_prompt = self.all_prompts[0], self.all_negative_prompts[0]

    def cached_params(self, required_prompts, steps, extra_network_data, hires_steps=None, use_old_scheduling=False):
        """Mirrors StableDiffusionProcessing.cached_params (v1.10.1): the cond cache key."""
        o = opts
        key = (required_prompts, steps, hires_steps, use_old_scheduling, o.CLIP_stop_at_last_layers, shared.sd_model.sd_checkpoint_info)
        return (
            *key,
            extra_network_data,
            o.sdxl_crop_left,
            o.sdxl_crop_top,
            self.width,
            self.height,
            o.fp8_storage,
            o.cache_fp16_weight,
            o.emphasis,
        )

    def get_conds_with_caching(self, function, required_prompts, steps, caches, extra_network_data, hires_steps=None):
        """Mirrors StableDiffusionProcessing.get_conds_with_caching (v1.10.1): hit any cache, write caches[0]."""
        if opts.use_old_scheduling:
            old = prompt_parser.get_learned_conditioning_prompt_schedules(required_prompts, steps, hires_steps, False)
            new = prompt_parser.get_learned_conditioning_prompt_schedules(required_prompts, steps, hires_steps, True)
            if old != new:
                self.extra_generation_params["Old prompt editing timelines"] = True
        key = self.cached_params(required_prompts, steps, extra_network_data, hires_steps, opts.use_old_scheduling)
        for cache in caches:
            if cache[0] is not None and key == cache[0]:
                return cache[1]
        cache = caches[0]
        cache[1] = function(shared.sd_model, required_prompts, steps, hires_steps, opts.use_old_scheduling)
        cache[0] = key
        return cache[1]

    def setup_conds(self):
        """Mirrors StableDiffusionProcessing.setup_conds (v1.10.1): uc first, then c, over the sampler's total steps."""
        prompts = prompt_parser.SdConditioning(self.prompts, width=self.width, height=self.height)
        negative_prompts = prompt_parser.SdConditioning(
            self.negative_prompts, width=self.width, height=self.height, is_negative_prompt=True
        )
        config = sd_samplers.find_sampler_config(self.sampler_name)
        total_steps = config.total_steps(self.steps) if config else self.steps
        self.step_multiplier = total_steps // self.steps
        self.firstpass_steps = total_steps
        self.uc = self.get_conds_with_caching(
            prompt_parser.get_learned_conditioning, negative_prompts, total_steps, [self.cached_uc], self.extra_network_data
        )
        self.c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning, prompts, total_steps, [self.cached_c], self.extra_network_data
        )

    def get_conds(self):
        return self.c, self.uc

    def parse_extra_network_prompts(self):
        """Mirrors StableDiffusionProcessing.parse_extra_network_prompts (v1.10.1): only ``prompts`` are parsed."""
        self.prompts, self.extra_network_data = extra_networks.parse_prompts(self.prompts)


class Processed:
    """Mirrors processing.Processed (v1.10.1); ``images`` are latents."""

    def __init__(
        self,
        p,
        images_list,
        seed=-1,
        info="",
        subseed=None,
        all_prompts=None,
        all_negative_prompts=None,
        all_seeds=None,
        all_subseeds=None,
        index_of_first_image=0,
        infotexts=None,
        comments="",
    ):
        self.images, self.info, self.index_of_first_image = images_list, info, index_of_first_image
        self.prompt = p.prompt[0] if isinstance(p.prompt, list) else p.prompt
        self.negative_prompt = p.negative_prompt[0] if isinstance(p.negative_prompt, list) else p.negative_prompt
        self.seed = int(seed[0] if isinstance(seed, list) else seed) if seed is not None else -1
        self.subseed = int(subseed[0] if isinstance(subseed, list) else subseed) if subseed is not None else -1
        self.subseed_strength, self.width, self.height = p.subseed_strength, p.width, p.height
        self.sampler_name, self.cfg_scale, self.steps, self.batch_size = p.sampler_name, p.cfg_scale, p.steps, p.batch_size
        self.image_cfg_scale = getattr(p, "image_cfg_scale", None)
        self.denoising_strength = getattr(p, "denoising_strength", None)
        self.sd_model_name, self.sd_model_hash = p.sd_model_name, p.sd_model_hash
        self.extra_generation_params = p.extra_generation_params
        self.styles, self.job_timestamp, self.clip_skip = p.styles, state.job_timestamp, opts.CLIP_stop_at_last_layers
        self.s_min_uncond = p.s_min_uncond
        self.is_using_inpainting_conditioning = p.is_using_inpainting_conditioning
        self.all_prompts = all_prompts or p.all_prompts or [self.prompt]
        self.all_negative_prompts = all_negative_prompts or p.all_negative_prompts or [self.negative_prompt]
        self.all_seeds = all_seeds or p.all_seeds or [self.seed]
        self.all_subseeds = all_subseeds or p.all_subseeds or [self.subseed]
        self.infotexts = infotexts or [info] * len(images_list)
        self.version = VERSION

    def js(self):
        """Mirrors Processed.js (v1.10.1): JSON, with anything not serialisable written as null."""
        keys = str.split(JS_KEYS)
        return json.dumps({k: getattr(self, k) for k in keys}, default=lambda o: None)

    def infotext(self, p, index):
        """Mirrors Processed.infotext (v1.10.1)."""
        size = self.batch_size
        return create_infotext(p, self.all_prompts, self.all_seeds, self.all_subseeds, [], index // size, index % size)


def create_infotext(
    p,
    all_prompts,
    all_seeds,
    all_subseeds,
    comments=None,
    iteration=0,
    position_in_batch=0,
    use_main_prompt=False,
    index=None,
    all_negative_prompts=None,
):
    """Mirrors processing.create_infotext (v1.10.1) with its core keys; list values are indexed, callables get locals()."""
    if use_main_prompt:
        index = 0
    elif index is None:
        index = position_in_batch + iteration * p.batch_size
    all_negative_prompts = all_negative_prompts if all_negative_prompts is not None else p.all_negative_prompts
    clip_skip = getattr(p, "clip_skip", opts.CLIP_stop_at_last_layers)
    prompt_text = p.main_prompt if use_main_prompt else all_prompts[index]
    negative_prompt = p.main_negative_prompt if use_main_prompt else all_negative_prompts[index]
    generation_params = {
        "Steps": p.steps,
        "Sampler": p.sampler_name,
        "Schedule type": p.scheduler,
        "CFG scale": p.cfg_scale,
        "Image CFG scale": getattr(p, "image_cfg_scale", None),
        "Seed": p.all_seeds[0] if use_main_prompt else all_seeds[index],
        "Size": f"{p.width}x{p.height}",
        "Model hash": p.sd_model_hash,
        "Model": p.sd_model_name,
        "Denoising strength": p.extra_generation_params.get("Denoising strength"),
        "Clip skip": None if clip_skip <= 1 else clip_skip,
        **p.extra_generation_params,
        "Version": VERSION,
    }
    for key, value in generation_params.items():
        try:
            if isinstance(value, list):
                generation_params[key] = value[index]
            elif callable(value):
                generation_params[key] = value(**locals())
        except Exception:
            errors.report(f'Error creating infotext for key "{key}"', exc_info=True)
            generation_params[key] = None
    text = ", ".join([k if k == v else f"{k}: {infotext_utils.quote(v)}" for k, v in generation_params.items() if v is not None])
    negative_text = f"\nNegative prompt: {negative_prompt}" if negative_prompt else ""
    return f"{prompt_text}{negative_text}\n{text}".strip()


def process_images(p: StableDiffusionProcessing) -> Processed:
    """Mirrors processing.process_images (v1.10.1): before_process, override_settings, the job, restore opts."""
    if p.scripts is not None:
        p.scripts.before_process(p)
    stored_opts = {k: opts.data[k] for k in p.override_settings if k in opts.data}
    try:
        if p.override_settings.get("sd_model_checkpoint") not in sd_models.checkpoints_list:
            p.override_settings.pop("sd_model_checkpoint", None)
            sd_models.reload_model_weights()
        for k, v in p.override_settings.items():
            opts.set(k, v, is_api=True, run_callbacks=False)
            if k == "sd_model_checkpoint":
                sd_models.reload_model_weights()
        res = process_images_inner(p)
    finally:
        if p.override_settings_restore_afterwards:
            for k, v in stored_opts.items():
                setattr(opts, k, v)
    return res


def process_images_inner(p: StableDiffusionProcessing) -> Processed:
    """Mirrors processing.process_images_inner (v1.10.1): the hook order of the job loop (no decode, grid or saving)."""
    seed = p.seed if isinstance(p.seed, list) or p.seed != -1 else 1234
    subseed = p.subseed if p.subseed != -1 else 5678
    if p.refiner_checkpoint not in (None, "", "None", "none"):
        p.refiner_checkpoint_info = sd_models.get_closet_checkpoint_match(p.refiner_checkpoint)
        if p.refiner_checkpoint_info is None:
            raise Exception(f"Could not find checkpoint with name {p.refiner_checkpoint}")
    p.sd_model_name = shared.sd_model.sd_checkpoint_info.name_for_extra
    p.sd_model_hash = shared.sd_model.sd_model_hash
    p.fill_fields_from_opts()
    p.setup_prompts()
    p.all_seeds = seed if isinstance(seed, list) else [int(seed) + (x if p.subseed_strength == 0 else 0) for x in range(len(p.all_prompts))]
    p.all_subseeds = [int(subseed) + x for x in range(len(p.all_prompts))]
    if p.scripts is not None:
        p.scripts.process(p)

    infotexts, output_images = [], []
    with torch.no_grad(), p.sd_model.ema_scope():
        p.init(p.all_prompts, p.all_seeds, p.all_subseeds)
        if state.job_count == -1:
            state.job_count = p.n_iter
        for n in range(p.n_iter):
            p.iteration = n
            if state.skipped:
                state.skipped = False
            if state.interrupted or state.stopping_generation:
                break
            sd_models.reload_model_weights()  # undo a refiner switch
            batch = slice(n * p.batch_size, (n + 1) * p.batch_size)
            p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
            p.seeds, p.subseeds = p.all_seeds[batch], p.all_subseeds[batch]
            latent_channels = getattr(shared.sd_model, "latent_channels", opt_C)
            p.rng = rng.ImageRNG((latent_channels, p.height // opt_f, p.width // opt_f), p.seeds, subseeds=p.subseeds)
            if p.scripts is not None:
                p.scripts.before_process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            if len(p.prompts) == 0:
                break
            p.parse_extra_network_prompts()
            if not p.disable_extra_networks:
                extra_networks.activate(p, p.extra_network_data)
            if p.scripts is not None:
                p.scripts.process_batch(p, batch_number=n, prompts=p.prompts, seeds=p.seeds, subseeds=p.subseeds)
            p.setup_conds()
            samples = p.sample(
                conditioning=p.c,
                unconditional_conditioning=p.uc,
                seeds=p.seeds,
                subseeds=p.subseeds,
                subseed_strength=p.subseed_strength,
                prompts=p.prompts,
            )
            if p.scripts is not None:
                ps = scripts.PostSampleArgs(samples)
                p.scripts.post_sample(p, ps)
                samples = ps.samples
            state.nextjob()
            if p.scripts is not None:
                p.scripts.postprocess_batch(p, samples, batch_number=n)
                p.prompts, p.negative_prompts = p.all_prompts[batch], p.all_negative_prompts[batch]
                batch_params = scripts.PostprocessBatchListArgs(list(samples))
                p.scripts.postprocess_batch_list(p, batch_params, batch_number=n)
                samples = batch_params.images
            for i, sample in enumerate(samples):
                if p.scripts is not None:  # ADetailer runs its inpaint jobs here, before postprocess
                    pp = scripts.PostprocessImageArgs(sample)
                    p.scripts.postprocess_image(p, pp)
                    sample = pp.image
                infotexts.append(create_infotext(p, p.prompts, p.seeds, p.subseeds, index=i, all_negative_prompts=p.negative_prompts))
                output_images.append(sample)
        if not infotexts:
            infotexts.append(Processed(p, []).infotext(p, 0))

    if not p.disable_extra_networks and p.extra_network_data:
        extra_networks.deactivate(p, p.extra_network_data)
    res = Processed(p, images_list=output_images, seed=p.all_seeds[0], info=infotexts[0], subseed=p.all_subseeds[0], infotexts=infotexts)
    if p.scripts is not None:
        p.scripts.postprocess(p, res)
    return res


@dataclass(repr=False)
class StableDiffusionProcessingTxt2Img(StableDiffusionProcessing):
    """Mirrors processing.StableDiffusionProcessingTxt2Img (v1.10.1) with latent upscalers only."""

    enable_hr: bool = False
    denoising_strength: float = 0.75
    hr_scale: float = 2.0
    hr_upscaler: str = None
    hr_second_pass_steps: int = 0
    hr_resize_x: int = 0
    hr_resize_y: int = 0
    hr_checkpoint_name: str = None
    hr_sampler_name: str = None
    hr_scheduler: str = None
    hr_prompt: Any = ""
    hr_negative_prompt: Any = ""

    cached_hr_uc: ClassVar[list] = [None, None]
    cached_hr_c: ClassVar[list] = [None, None]

    hr_checkpoint_info: Any = field(default=None, init=False)
    hr_upscale_to_x: int = field(default=0, init=False)
    hr_upscale_to_y: int = field(default=0, init=False)
    latent_scale_mode: dict = field(default=None, init=False)
    hr_c: Any = field(default=None, init=False)
    hr_uc: Any = field(default=None, init=False)
    all_hr_prompts: list = field(default=None, init=False)
    all_hr_negative_prompts: list = field(default=None, init=False)
    hr_prompts: list = field(default=None, init=False)
    hr_negative_prompts: list = field(default=None, init=False)
    hr_extra_network_data: Any = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.cached_hr_uc = StableDiffusionProcessingTxt2Img.cached_hr_uc
        self.cached_hr_c = StableDiffusionProcessingTxt2Img.cached_hr_c

    def calculate_target_resolution(self):
        """Mirrors calculate_target_resolution (v1.10.1) for ``hr_scale`` and one-sided ``hr_resize_*``."""
        if self.hr_resize_x == 0 and self.hr_resize_y == 0:
            self.extra_generation_params["Hires upscale"] = self.hr_scale
            self.hr_upscale_to_x, self.hr_upscale_to_y = int(self.width * self.hr_scale), int(self.height * self.hr_scale)
        else:
            self.extra_generation_params["Hires resize"] = f"{self.hr_resize_x}x{self.hr_resize_y}"
            self.hr_upscale_to_x = self.hr_resize_x or self.hr_resize_y * self.width // self.height
            self.hr_upscale_to_y = self.hr_resize_y or self.hr_resize_x * self.height // self.width

    def init(self, all_prompts, all_seeds, all_subseeds):
        """Mirrors StableDiffusionProcessingTxt2Img.init (v1.10.1)."""
        if not self.enable_hr:
            return
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        if self.hr_checkpoint_name and self.hr_checkpoint_name != "Use same checkpoint":
            self.hr_checkpoint_info = sd_models.get_closet_checkpoint_match(self.hr_checkpoint_name)
            if self.hr_checkpoint_info is None:
                raise Exception(f"Could not find checkpoint with name {self.hr_checkpoint_name}")
            self.extra_generation_params["Hires checkpoint"] = self.hr_checkpoint_info.short_title
        if self.hr_sampler_name is not None and self.hr_sampler_name != self.sampler_name:
            self.extra_generation_params["Hires sampler"] = self.hr_sampler_name

        def get_hr_prompt(p, index, prompt_text, **kwargs):
            return p.all_hr_prompts[index] if p.all_hr_prompts[index] != prompt_text else None

        def get_hr_negative_prompt(p, index, negative_prompt, **kwargs):
            return p.all_hr_negative_prompts[index] if p.all_hr_negative_prompts[index] != negative_prompt else None

        self.extra_generation_params["Hires prompt"] = get_hr_prompt
        self.extra_generation_params["Hires negative prompt"] = get_hr_negative_prompt
        self.extra_generation_params["Hires schedule type"] = None
        self.hr_scheduler = self.hr_scheduler if self.hr_scheduler is not None else self.scheduler
        self.latent_scale_mode = shared.latent_upscale_modes.get(self.hr_upscaler or shared.latent_upscale_default_mode)
        if self.latent_scale_mode is None:
            raise Exception(f"could not find upscaler named {self.hr_upscaler} (the stand-in has latent upscalers only)")
        self.calculate_target_resolution()
        if self.hr_second_pass_steps:
            self.extra_generation_params["Hires steps"] = self.hr_second_pass_steps
        if self.hr_upscaler is not None:
            self.extra_generation_params["Hires upscaler"] = self.hr_upscaler

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        """Mirrors StableDiffusionProcessingTxt2Img.sample (v1.10.1)."""
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        x = self.rng.next()
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=x, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample(
            self, x, conditioning, unconditional_conditioning, image_conditioning=self.txt2img_image_conditioning(x)
        )
        if not self.enable_hr:
            return samples
        with sd_models.SkipWritingToConfig():
            sd_models.reload_model_weights(info=self.hr_checkpoint_info)
        return self.sample_hr_pass(samples, None, seeds, subseeds, subseed_strength, prompts)

    def sample_hr_pass(self, samples, decoded_samples, seeds, subseeds, subseed_strength, prompts):
        """Mirrors StableDiffusionProcessingTxt2Img.sample_hr_pass (v1.10.1), latent upscale only."""
        if state.interrupted:
            return samples
        self.is_hr_pass = True
        self.sampler = sd_samplers.create_sampler(self.hr_sampler_name or self.sampler_name, self.sd_model)
        size = (self.hr_upscale_to_y // opt_f, self.hr_upscale_to_x // opt_f)
        samples = torch.nn.functional.interpolate(
            samples, size=size, mode=self.latent_scale_mode["mode"], antialias=self.latent_scale_mode["antialias"]
        )
        image_conditioning = self.txt2img_image_conditioning(samples)
        state.nextjob()
        self.rng = rng.ImageRNG(samples.shape[1:], self.seeds, subseeds=self.subseeds)
        noise = self.rng.next()
        if not self.disable_extra_networks:
            extra_networks.activate(self, self.hr_extra_network_data)
        self.calculate_hr_conds()
        if self.scripts is not None:
            self.scripts.before_hr(self)
            self.scripts.process_before_every_sampling(p=self, x=samples, noise=noise, c=self.hr_c, uc=self.hr_uc)
        samples = self.sampler.sample_img2img(
            self,
            samples,
            noise,
            self.hr_c,
            self.hr_uc,
            steps=self.hr_second_pass_steps or self.steps,
            image_conditioning=image_conditioning,
        )
        self.sampler = None
        self.is_hr_pass = False
        return samples

    def close(self):
        """Mirrors StableDiffusionProcessingTxt2Img.close (v1.10.1)."""
        super().close()
        self.hr_c = self.hr_uc = None
        if not opts.persistent_cond_cache:
            StableDiffusionProcessingTxt2Img.cached_hr_uc = [None, None]
            StableDiffusionProcessingTxt2Img.cached_hr_c = [None, None]

    def setup_prompts(self):
        """Mirrors StableDiffusionProcessingTxt2Img.setup_prompts (v1.10.1) without styles."""
        super().setup_prompts()
        if not self.enable_hr:
            return
        self.hr_prompt = self.hr_prompt if self.hr_prompt != "" else self.prompt
        self.hr_negative_prompt = self.hr_negative_prompt if self.hr_negative_prompt != "" else self.negative_prompt
        count = self.batch_size * self.n_iter
        self.all_hr_prompts = self.hr_prompt if isinstance(self.hr_prompt, list) else count * [self.hr_prompt]
        self.all_hr_negative_prompts = (
            self.hr_negative_prompt if isinstance(self.hr_negative_prompt, list) else count * [self.hr_negative_prompt]
        )

    def calculate_hr_conds(self):
        """Mirrors calculate_hr_conds (v1.10.1): ``steps`` = first-pass total, ``hires_steps`` = hires total."""
        if self.hr_c is not None:
            return
        hr_prompts = prompt_parser.SdConditioning(self.hr_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y)
        hr_negative_prompts = prompt_parser.SdConditioning(
            self.hr_negative_prompts, width=self.hr_upscale_to_x, height=self.hr_upscale_to_y, is_negative_prompt=True
        )
        config = sd_samplers.find_sampler_config(self.hr_sampler_name or self.sampler_name)
        steps = self.hr_second_pass_steps or self.steps
        total_steps = config.total_steps(steps) if config else steps
        self.hr_uc = self.get_conds_with_caching(
            prompt_parser.get_learned_conditioning,
            hr_negative_prompts,
            self.firstpass_steps,
            [self.cached_hr_uc, self.cached_uc],
            self.hr_extra_network_data,
            total_steps,
        )
        self.hr_c = self.get_conds_with_caching(
            prompt_parser.get_multicond_learned_conditioning,
            hr_prompts,
            self.firstpass_steps,
            [self.cached_hr_c, self.cached_c],
            self.hr_extra_network_data,
            total_steps,
        )

    def setup_conds(self):
        """Mirrors StableDiffusionProcessingTxt2Img.setup_conds (v1.10.1) (no lowvram branch)."""
        if self.is_hr_pass:  # a refiner switch during the hires pass
            self.hr_c = None
            self.calculate_hr_conds()
            return
        super().setup_conds()
        self.hr_uc = self.hr_c = None
        if self.enable_hr and self.hr_checkpoint_info is None and opts.hires_fix_use_firstpass_conds:
            self.calculate_hr_conds()

    def get_conds(self):
        """Mirrors StableDiffusionProcessingTxt2Img.get_conds (v1.10.1)."""
        return (self.hr_c, self.hr_uc) if self.is_hr_pass else super().get_conds()

    def parse_extra_network_prompts(self):
        """Mirrors StableDiffusionProcessingTxt2Img.parse_extra_network_prompts (v1.10.1)."""
        res = super().parse_extra_network_prompts()
        if self.enable_hr:
            batch = slice(self.iteration * self.batch_size, (self.iteration + 1) * self.batch_size)
            self.hr_prompts, self.hr_negative_prompts = self.all_hr_prompts[batch], self.all_hr_negative_prompts[batch]
            self.hr_prompts, self.hr_extra_network_data = extra_networks.parse_prompts(self.hr_prompts)
        return res


@dataclass(repr=False)
class StableDiffusionProcessingImg2Img(StableDiffusionProcessing):
    """Mirrors processing.StableDiffusionProcessingImg2Img (v1.10.1) on latents.

    Stand-in inputs: ``init_latent`` (``[1 or B, C, H/8, W/8]``; default: seeded noise) replaces the
    encoded init images; ``mask`` is a latent-resolution tensor, 1 where the image is regenerated."""

    init_latent: torch.Tensor = None
    denoising_strength: float = 0.75
    image_cfg_scale: float = None
    mask: Any = None
    inpainting_fill: int = 1
    initial_noise_multiplier: float = None

    image_mask: Any = field(default=None, init=False)
    nmask: torch.Tensor = field(default=None, init=False)
    image_conditioning: torch.Tensor = field(default=None, init=False)

    def __post_init__(self):
        super().__post_init__()
        self.image_mask, self.mask = self.mask, None
        self.initial_noise_multiplier = (
            opts.initial_noise_multiplier if self.initial_noise_multiplier is None else self.initial_noise_multiplier
        )

    def init(self, all_prompts, all_seeds, all_subseeds):
        """Mirrors StableDiffusionProcessingImg2Img.init (v1.10.1) for latent inputs."""
        self.extra_generation_params["Denoising strength"] = self.denoising_strength
        self.image_cfg_scale = self.image_cfg_scale if shared.sd_model.cond_stage_key == "edit" else None
        self.sampler = sd_samplers.create_sampler(self.sampler_name, self.sd_model)
        shape = (getattr(shared.sd_model, "latent_channels", opt_C), self.height // opt_f, self.width // opt_f)
        if self.init_latent is None:
            self.init_latent = rng.ImageRNG(shape, [int(all_seeds[0]) + 1000]).next()
        self.init_latent = (
            self.init_latent.expand(self.batch_size, *self.init_latent.shape[1:]).clone()
            if self.init_latent.shape[0] == 1
            else self.init_latent
        )
        if self.image_mask is not None:
            latmask = torch.as_tensor(self.image_mask, dtype=self.init_latent.dtype).expand(shape)
            self.mask, self.nmask = 1.0 - latmask, latmask
            if self.inpainting_fill == 2:
                self.init_latent = (
                    self.init_latent * self.mask + rng.ImageRNG(shape, all_seeds[: self.init_latent.shape[0]]).next() * self.nmask
                )
            elif self.inpainting_fill == 3:
                self.init_latent = self.init_latent * self.mask
        if shared.sd_model.cond_stage_key == "edit":  # stand-in for encode_first_stage(init image).mode()
            self.image_conditioning = self.init_latent
        else:
            self.image_conditioning = self.init_latent.new_zeros(self.init_latent.shape[0], 5, 1, 1)

    def sample(self, conditioning, unconditional_conditioning, seeds, subseeds, subseed_strength, prompts):
        """Mirrors StableDiffusionProcessingImg2Img.sample (v1.10.1)."""
        x = self.rng.next()
        if self.initial_noise_multiplier != 1.0:
            self.extra_generation_params["Noise multiplier"] = self.initial_noise_multiplier
            x *= self.initial_noise_multiplier
        if self.scripts is not None:
            self.scripts.process_before_every_sampling(p=self, x=self.init_latent, noise=x, c=conditioning, uc=unconditional_conditioning)
        samples = self.sampler.sample_img2img(
            self, self.init_latent, x, conditioning, unconditional_conditioning, image_conditioning=self.image_conditioning
        )
        if self.mask is not None:
            blended = samples * self.nmask + self.init_latent * self.mask
            if self.scripts is not None:
                mba = scripts.MaskBlendArgs(samples, self.nmask, self.init_latent, self.mask, blended)
                self.scripts.on_mask_blend(self, mba)
                blended = mba.blended_latent
            samples = blended
        return samples
