"""The NAG negative conditioning: the NAG negative prompt of each image, encoded by the host's own
prompt pipeline, and the entry of its prompt schedule at a step."""

from __future__ import annotations

from typing import Any

from ..params import NagParams


def negative_texts(p: Any, params: NagParams, is_hires: bool) -> list[str]:
    """One NAG negative per image of the batch: the NAG box with ``<lora:…>`` tags stripped,
    or, when it is empty, each image's main negative prompt."""
    from modules import extra_networks

    images = p.hr_negative_prompts if is_hires else p.negative_prompts
    if not params.negative_prompt.strip():
        return list(images)
    text, _networks = extra_networks.parse_prompt(params.negative_prompt)
    return [text] * len(images)


def total_steps(sampler_name: str | None, steps: int) -> int:
    """Denoiser calls for ``steps`` of a sampler, as the host counts them for prompt schedules."""
    from modules import sd_samplers

    config = sd_samplers.find_sampler_config(sampler_name)
    return config.total_steps(steps) if config else steps


class NegativeConditioning:
    """The NAG negative, encoded by the host's own prompt pipeline (emphasis, embeddings, BREAK,
    chunks, clip skip, prompt scheduling) after extra networks are active, cached with the host's
    own keys. Unlike the host's negatives, an empty prompt is encoded, not zeroed."""

    def __init__(self) -> None:
        self._caches = {False: [None, None], True: [None, None]}

    def encode(self, p: Any, params: NagParams, is_hires: bool, as_negative_prompt: bool = False) -> list:
        """Each image's prompt schedule of the NAG negative; ``as_negative_prompt`` marks it as the host
        marks a negative prompt (engines that template negatives, or treat positives' reference images)."""
        from modules import prompt_parser

        texts = negative_texts(p, params, is_hires)
        # The host's own schedule steps: first-pass total steps, plus the hires total in the hires pass.
        first_pass_steps = total_steps(p.sampler_name, p.steps)
        if is_hires:
            hires_steps = total_steps(getattr(p, "hr_sampler_name", None) or p.sampler_name, p.hr_second_pass_steps or p.steps)
            width, height, networks = p.hr_upscale_to_x, p.hr_upscale_to_y, p.hr_extra_network_data
        else:
            hires_steps, width, height, networks = None, p.width, p.height, p.extra_network_data
        prompts = prompt_parser.SdConditioning(texts, is_negative_prompt=as_negative_prompt, width=width, height=height)
        cache = self._caches[is_hires]
        return p.get_conds_with_caching(prompt_parser.get_learned_conditioning, prompts, first_pass_steps, [cache], networks, hires_steps)

    def forget(self) -> None:
        for cache in self._caches.values():
            cache[:] = [None, None]


def schedule_indices(schedules: list, step: int) -> tuple[int, ...]:
    """Which entry of each image's prompt schedule the host uses at ``step``."""
    return tuple(next((i for i, entry in enumerate(s) if step <= entry.end_at_step), 0) for s in schedules)


def crossattn(cond: Any) -> Any:
    """The cross-attention context of a conditioning (SDXL conds are dicts)."""
    return cond["crossattn"] if isinstance(cond, dict) else cond
