"""Mirrors modules/prompt_parser.py (v1.10.1): prompt schedules, AND composition and cond batches.

Prompt editing: only the non-nested forms ``[from:to:when]``, ``[to:when]`` and ``[from::when]`` are
parsed (``from``/``to`` without brackets or colons); everything else, including ``[a|b]`` alternation,
emphasis and nesting, stays literal text. ``when`` follows the host: a number written with a ``.`` is a
fraction of the steps, one without is an absolute step; with ``hires_steps`` (new scheduling) integers
are offset by the first-pass steps and fractions by 1.0, exactly as the host does.
"""

from __future__ import annotations

import re
from collections import namedtuple

import torch

re_scheduled = re.compile(r"\[(?:([^\[\]:]*):)?([^\[\]:]*):\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\]")
re_AND = re.compile(r"\bAND\b")
re_weight = re.compile(r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$")

ScheduledPromptConditioning = namedtuple("ScheduledPromptConditioning", ["end_at_step", "cond"])


def get_learned_conditioning_prompt_schedules(prompts, base_steps, hires_steps=None, use_old_scheduling=False):
    """Mirrors prompt_parser.get_learned_conditioning_prompt_schedules (v1.10.1) for the supported forms."""
    if hires_steps is None or use_old_scheduling:
        int_offset, flt_offset, steps = 0, 0.0, base_steps
    else:
        int_offset, flt_offset, steps = base_steps, 1.0, hires_steps

    def when(text: str) -> int:
        v = float(text)
        if use_old_scheduling:
            return min(steps, int(v * steps if v < 1 else v))
        return min(steps, int((v - flt_offset) * steps if "." in text else v - int_offset))

    def schedule(prompt: str) -> list:
        whens = [when(m.group(3)) for m in re_scheduled.finditer(prompt)]

        def at(step: int) -> str:
            it = iter(whens)
            return re_scheduled.sub(lambda m: (m.group(1) or "") if step <= next(it) else m.group(2), prompt)

        return [[t, at(t)] for t in sorted({steps, *[w for w in whens if w >= 1]})]

    cache = {prompt: schedule(prompt) for prompt in set(prompts)}
    return [cache[prompt] for prompt in prompts]


class SdConditioning(list):
    """Mirrors prompt_parser.SdConditioning (v1.10.1): a list of prompts with width/height/negative flags."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        copy_from = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(copy_from, "is_negative_prompt", False)
        self.width = width or getattr(copy_from, "width", None)
        self.height = height or getattr(copy_from, "height", None)


def get_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False):
    """Mirrors prompt_parser.get_learned_conditioning (v1.10.1): one encoder call per distinct prompt."""
    res, cache = [], {}
    for prompt, prompt_schedule in zip(
        prompts, get_learned_conditioning_prompt_schedules(prompts, steps, hires_steps, use_old_scheduling), strict=True
    ):
        if prompt not in cache:
            conds = model.get_learned_conditioning(SdConditioning([text for _, text in prompt_schedule], copy_from=prompts))
            cache[prompt] = [
                ScheduledPromptConditioning(end, {k: v[i] for k, v in conds.items()} if isinstance(conds, dict) else conds[i])
                for i, (end, _) in enumerate(prompt_schedule)
            ]
        res.append(cache[prompt])
    return res


def get_multicond_prompt_list(prompts):
    """Mirrors prompt_parser.get_multicond_prompt_list (v1.10.1): split on AND, read ``:weight``, dedup texts."""
    res_indexes, prompt_indexes = [], {}
    flat = SdConditioning(prompts)
    flat.clear()
    for prompt in prompts:
        indexes = []
        for subprompt in re_AND.split(prompt):
            match = re_weight.search(subprompt)
            text, weight = match.groups() if match is not None else (subprompt, 1.0)
            if text not in prompt_indexes:
                prompt_indexes[text] = len(flat)
                flat.append(text)
            indexes.append((prompt_indexes[text], float(weight) if weight is not None else 1.0))
        res_indexes.append(indexes)
    return res_indexes, flat, prompt_indexes


class ComposableScheduledPromptConditioning:
    """Mirrors prompt_parser.ComposableScheduledPromptConditioning (v1.10.1)."""

    def __init__(self, schedules, weight=1.0):
        self.schedules: list[ScheduledPromptConditioning] = schedules
        self.weight: float = weight


class MulticondLearnedConditioning:
    """Mirrors prompt_parser.MulticondLearnedConditioning (v1.10.1)."""

    def __init__(self, shape, batch):
        self.shape: tuple = shape
        self.batch: list[list[ComposableScheduledPromptConditioning]] = batch


def get_multicond_learned_conditioning(model, prompts, steps, hires_steps=None, use_old_scheduling=False) -> MulticondLearnedConditioning:
    """Mirrors prompt_parser.get_multicond_learned_conditioning (v1.10.1)."""
    res_indexes, flat, _ = get_multicond_prompt_list(prompts)
    learned = get_learned_conditioning(model, flat, steps, hires_steps, use_old_scheduling)
    batch = [[ComposableScheduledPromptConditioning(learned[i], weight) for i, weight in indexes] for indexes in res_indexes]
    return MulticondLearnedConditioning(shape=(len(prompts),), batch=batch)


class DictWithShape(dict):
    """Mirrors prompt_parser.DictWithShape (v1.10.1): a dict whose ``shape`` is its crossattn shape."""

    def __init__(self, x, shape=None):
        super().__init__()
        self.update(x)

    @property
    def shape(self):
        return self["crossattn"].shape


def _schedule_index(schedules, current_step: int) -> int:
    return next((i for i, entry in enumerate(schedules) if current_step <= entry.end_at_step), 0)


def reconstruct_cond_batch(c, current_step):
    """Mirrors prompt_parser.reconstruct_cond_batch (v1.10.1): one row per prompt, no padding."""
    param = c[0][0].cond
    if isinstance(param, dict):
        res = DictWithShape({k: torch.zeros((len(c), *v.shape), device=v.device, dtype=v.dtype) for k, v in param.items()})
    else:
        res = torch.zeros((len(c), *param.shape), device=param.device, dtype=param.dtype)
    for i, schedules in enumerate(c):
        cond = schedules[_schedule_index(schedules, current_step)].cond
        if isinstance(param, dict):
            for k, v in cond.items():
                res[k][i] = v
        else:
            res[i] = cond
    return res


def stack_conds(tensors):
    """Mirrors prompt_parser.stack_conds (v1.10.1): pad shorter ``[T, C]`` rows by repeating their last token."""
    token_count = max(x.shape[0] for x in tensors)
    tensors = [x if x.shape[0] == token_count else torch.vstack([x, x[-1:].repeat([token_count - x.shape[0], 1])]) for x in tensors]
    return torch.stack(tensors)


def reconstruct_multicond_batch(c: MulticondLearnedConditioning, current_step):
    """Mirrors prompt_parser.reconstruct_multicond_batch (v1.10.1): ``(conds_list, stacked)``."""
    param = c.batch[0][0].schedules[0].cond
    tensors, conds_list = [], []
    for composable_prompts in c.batch:
        conds_for_image = []
        for composable in composable_prompts:
            conds_for_image.append((len(tensors), composable.weight))
            tensors.append(composable.schedules[_schedule_index(composable.schedules, current_step)].cond)
        conds_list.append(conds_for_image)
    if isinstance(tensors[0], dict):
        return conds_list, DictWithShape({k: stack_conds([x[k] for x in tensors]) for k in tensors[0]})
    return conds_list, stack_conds(tensors).to(device=param.device, dtype=param.dtype)
