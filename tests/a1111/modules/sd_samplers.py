"""Mirrors modules/sd_samplers.py (v1.10.1): the sampler registry."""

from __future__ import annotations

from modules import sd_samplers_kdiffusion, sd_samplers_timesteps

all_samplers = [*sd_samplers_kdiffusion.samplers_data_k_diffusion, *sd_samplers_timesteps.samplers_data_timesteps]
all_samplers_map = {x.name: x for x in all_samplers}


def find_sampler_config(name):
    """Mirrors sd_samplers.find_sampler_config (v1.10.1)."""
    return all_samplers_map.get(name) if name is not None else all_samplers[0]


def create_sampler(name, model):
    """Mirrors sd_samplers.create_sampler (v1.10.1): a fresh sampler per pass."""
    config = find_sampler_config(name)
    assert config is not None, f"bad sampler name: {name}"
    if model.is_sdxl and config.options.get("no_sdxl", False):
        raise Exception(f"Sampler {config.name} is not supported for SDXL")
    sampler = config.constructor(model)
    sampler.config = config
    return sampler


def get_sampler_and_scheduler(sampler_name, scheduler_name):
    """Mirrors sd_samplers.get_sampler_and_scheduler (v1.10.1) without schedulers (the stand-in has only
    the model's own, "Automatic"): a sampler name the registry does not have gives the first sampler
    (the host's DPM++ 2M; here Euler), as in the host."""
    sampler = all_samplers_map.get(sampler_name or all_samplers[0].name, all_samplers[0])
    return sampler.name, "Automatic"
