"""The Forge family (Forge 2, reForge, Forge Classic, Forge Neo): NAG as attn2 replace patches.

Per sampling pass (see ``webui.NagPass`` for the step window and the NAG negative), the pass
clones ``p.sd_model.forge_objects.unet`` and registers, for every transformer block, an attn2
replace: a closure over that block's attn2 module, so the NAG negative's K⁻/V⁻ are projected
at sampling time through the host's own weight casting and offload. The replace receives
projected q/k/v and returns the output before ``to_out``; the rows it guides are the chunks
that ``cond_or_uncond`` labels cond (0), in any order and any chunking. A replace already
registered for the block (IP-Adapter; 3-tuple or 2-tuple key) computes ``Z⁺``.
"""

from __future__ import annotations

from collections.abc import Callable
from importlib.util import find_spec
from typing import Any

import torch

from ..attention import PositiveRows, nag_attention
from . import webui

COND = 0  # cond_or_uncond label of a positive chunk
PREVIOUS = "_nag_previous"  # on our replace: the replace it chains to (None for the host's)

Replace = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, dict], torch.Tensor]


def host_attention() -> Callable[..., torch.Tensor]:
    """The host's attention function (its module picks it at import)."""
    if find_spec("backend") is not None:
        from backend import attention  # Forge 2, Neo

        return attention.attention_function
    from ldm_patched.ldm.modules import attention  # reForge, Forge Classic

    return attention.optimized_attention


def replace_key(name: str) -> tuple[str, int, int] | None:
    """``input_blocks.4.1.transformer_blocks.0.attn2`` → ``("input", 4, 0)``;
    ``middle_block.1.transformer_blocks.m.attn2`` → ``("middle", 0, m)``."""
    parts = name.split(".")
    if parts[0] == "middle_block":
        parts = [parts[0], "0", *parts[1:]]
    blocks = {"input_blocks": "input", "middle_block": "middle", "output_blocks": "output"}
    if len(parts) != 6 or parts[0] not in blocks or parts[2:4] != ["1", "transformer_blocks"] or parts[5] != "attn2":
        return None
    return blocks[parts[0]], int(parts[1]), int(parts[4])


def positive_chunks(cond_or_uncond: list[int], rows: int, device: torch.device) -> PositiveRows | None:
    """The rows of the chunks labelled cond; chunk ``i`` holds rows ``i·B … (i+1)·B−1`` and row
    ``j`` of every chunk is image ``j`` of the batch."""
    per_chunk = rows // len(cond_or_uncond)
    chunks = [i for i, label in enumerate(cond_or_uncond) if label == COND]
    if not chunks:
        return None
    images = list(range(per_chunk))
    return PositiveRows.of([c * per_chunk + j for c in chunks for j in images], images * len(chunks), device)


class ForgePass(webui.NagPass):
    def __init__(self, job: webui.NagJob, report: webui.PassReport) -> None:
        self.active = False
        self.patched: list[tuple[Any, Any, Any]] = []  # (sd_model, our clone, the patcher it replaced)
        self.attention = host_attention()
        self.rows: dict[tuple, PositiveRows | None] = {}  # per (cond_or_uncond, rows, device)
        super().__init__(job, report)

    def positive(self, cond_or_uncond: list[int], q: torch.Tensor) -> PositiveRows | None:
        key = (tuple(cond_or_uncond), q.shape[0], q.device)
        if key not in self.rows:
            self.rows[key] = positive_chunks(cond_or_uncond, q.shape[0], q.device)
        return self.rows[key]

    def hook(self, sd_model: Any) -> bool:
        original = sd_model.forge_objects.unet
        modules = webui.attn2_modules(original.model.diffusion_model)
        clone = original.clone()
        registered = clone.model_options.get("transformer_options", {}).get("patches_replace", {}).get("attn2", {})
        hooked = 0
        for name, module in modules:
            key = replace_key(name)
            if key is None:
                continue
            previous = registered.get(key) or registered.get(key[:2])
            # A patcher that already carries our replace (a hires pass on an unreset UNet)
            # chains to what ours chained to: never to ourselves.
            previous = getattr(previous, PREVIOUS, previous)
            clone.set_model_attn2_replace(self.replace_for(module, previous), *key)
            hooked += 1
        sd_model.forge_objects.unet = clone
        self.patched.append((sd_model, clone, original))
        self.report.layers = hooked
        return hooked > 0

    def unhook(self) -> None:
        self.active = False  # the replaces pass through to the host's attention

    def close(self) -> None:
        super().close()
        for sd_model, clone, original in self.patched:
            if sd_model.forge_objects.unet is clone:
                sd_model.forge_objects.unet = original
        self.patched = []

    def on_step(self, params: Any, denoiser: Any, active: bool) -> None:
        self.active = active

    def replace_for(self, module: torch.nn.Module, previous: Replace | None) -> Replace:
        def replace(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra_options: dict) -> torch.Tensor:
            heads = extra_options["n_heads"]
            if previous is None:
                attention = self.attention
            else:

                def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, _heads: int) -> torch.Tensor:
                    return previous(q, k, v, extra_options)

            positive = self.positive(extra_options["cond_or_uncond"], q) if self.active else None
            if positive is None or self.negative is None:
                return attention(q, k, v, heads)
            k_negative, v_negative = self.kv.get(module, self.negative, like=q)
            return nag_attention(q, k, v, heads, positive, k_negative, v_negative, self.params, host_attention=attention)

        setattr(replace, PREVIOUS, previous)
        return replace


class ForgeHost(webui.NagHost):
    pass_class = ForgePass

    def __init__(self) -> None:
        super().__init__()
        self.name = forge_variant()

    @staticmethod
    def unet(sd_model: Any) -> torch.nn.Module | None:
        patcher = getattr(getattr(sd_model, "forge_objects", None), "unet", None)
        return getattr(getattr(patcher, "model", None), "diffusion_model", None)


def forge_variant() -> str:
    """Which Forge, for the start-up line: by what the host ships, not by its name."""
    from modules_forge import forge_version

    if find_spec("backend") is not None:
        return "Forge Neo" if getattr(forge_version, "version", "") == "neo" else "Forge"
    return "reForge" if find_spec("ldm_patched.modules.patcher_extension") is not None else "Forge Classic"
