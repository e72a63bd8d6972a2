"""Tiled Diffusion's MultiDiffusion (pkuliyi2015/multidiffusion-upscaler-for-automatic1111
``22798f68``: ``scripts/tilediffusion.py`` ``process``/``reset``/``create_sampler_hijack``,
``tile_methods/multidiffusion.py`` ``hook``/``kdiff_forward``, ``tile_methods/abstractdiffusion.py``
``repeat_tensor``/``repeat_cond_dict``), reduced to plain tiles with uniform weights. Kept: in
``process`` it swaps ``sd_samplers.create_sampler`` for one that hooks each new sampler's
``model_wrap_cfg.inner_model.forward`` (an instance forward); that forward cuts ``x_in`` into tiles
(``x_in[:, :, y:y+h, x:x+w]``), batches them tile-major with ``torch.cat`` (rows: tile 0's whole
``x_in`` rows, then tile 1's, …), repeats sigma and the conds the same way (``expand`` for one row,
else ``repeat``), calls the inner model's saved bound forward, and averages the tiles back."""

import torch
from modules import scripts, sd_samplers


def repeat_tensor(x, n):
    """Mirrors repeat_tensor: n whole copies, one after another."""
    return x.expand(n, *x.shape[1:]) if x.shape[0] == 1 else x.repeat(n, *[1] * (x.dim() - 1))


def repeat_cond_dict(cond, n):
    """Mirrors repeat_cond_dict: every conditioning tensor repeated like x."""
    if isinstance(cond, torch.Tensor):
        return repeat_tensor(cond, n)
    if isinstance(cond, list):
        return [repeat_cond_dict(c, n) for c in cond]
    return {k: repeat_cond_dict(v, n) for k, v in cond.items()}


class MultiDiffusion:
    def __init__(self, sampler, tile, overlap, tile_batch):
        self.sampler, self.tile, self.overlap, self.tile_batch = sampler, tile, overlap, tile_batch

    def hook(self):
        inner = self.sampler.model_wrap_cfg.inner_model
        self.sampler_forward = inner.forward
        inner.forward = self.kdiff_forward

    def bboxes(self, height, width):
        stride = self.tile - self.overlap
        ys = range(0, max(height - self.overlap, 1), stride)
        xs = range(0, max(width - self.overlap, 1), stride)
        return [(slice(None), slice(None), slice(y, y + self.tile), slice(x, x + self.tile)) for y in ys for x in xs]

    def kdiff_forward(self, x_in, sigma_in, cond):
        buffer, weights = torch.zeros_like(x_in), torch.zeros_like(x_in)
        boxes = self.bboxes(*x_in.shape[-2:])
        for start in range(0, len(boxes), self.tile_batch):
            batch = boxes[start : start + self.tile_batch]
            x_tile = torch.cat([x_in[box] for box in batch], dim=0)
            out = self.sampler_forward(x_tile, repeat_tensor(sigma_in, len(batch)), cond=repeat_cond_dict(cond, len(batch)))
            rows = x_in.shape[0]
            for i, box in enumerate(batch):
                buffer[box] += out[i * rows : (i + 1) * rows]
                weights[box] += 1
        return buffer / weights


class TiledDiffusion(scripts.Script):
    def __init__(self, tile=8, overlap=4, tile_batch=4):
        self.tile, self.overlap, self.tile_batch = tile, overlap, tile_batch
        self.original = None

    def title(self):
        return "Tiled Diffusion"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        self.reset()
        self.original = original = sd_samplers.create_sampler

        def create_sampler_hijack(name, model):
            sampler = original(name, model)
            MultiDiffusion(sampler, self.tile, self.overlap, self.tile_batch).hook()
            return sampler

        sd_samplers.create_sampler = create_sampler_hijack

    def reset(self):
        if self.original is not None:
            sd_samplers.create_sampler, self.original = self.original, None

    def postprocess(self, p, processed, *args):
        self.reset()
