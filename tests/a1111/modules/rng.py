"""Mirrors modules/rng.py (v1.10.1): per-image seeded noise."""

from __future__ import annotations

import torch


class ImageRNG:
    """Mirrors rng.ImageRNG (v1.10.1): one CPU generator per seed; ``next()`` draws ``[B, *shape]`` (no subseeds)."""

    def __init__(self, shape, seeds, subseeds=None, subseed_strength=0.0, seed_resize_from_h=0, seed_resize_from_w=0):
        self.shape, self.seeds = tuple(shape), seeds
        self.generators = [torch.Generator().manual_seed(int(seed)) for seed in seeds]

    def next(self) -> torch.Tensor:
        return torch.stack([torch.randn(self.shape, generator=g) for g in self.generators])
