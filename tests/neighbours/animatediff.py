"""AnimateDiff's sliding context windows (continue-revolution/sd-webui-animatediff ``a88e8891``,
``scripts/animatediff_infv2v.py`` ``animatediff_on_cfg_denoiser``/``mm_sd_forward``), reduced to
the row handling: at step 0 it saves the denoiser's inner-model ``forward`` and installs its own,
which calls the saved one on windows of frames, gathered with advanced indexing (copies, not views):
``x_in[window + [i + frames for i in window]]`` (the window's cond frames, then their uncond)."""

import torch
from modules import script_callbacks, scripts


def mm_sd_forward(self, x_in, sigma_in, cond, frames, window):
    out = torch.zeros_like(x_in)
    for start in range(0, frames, window):
        context = list(range(start, min(start + window, frames)))
        rows = context + [i + frames for i in context]
        picked = {k: [v[0][rows]] if isinstance(v, list) else v[rows] for k, v in cond.items()}
        out[rows] = self.original_forward(x_in[rows], sigma_in[rows], cond=picked)
    return out


class AnimateDiff(scripts.Script):
    def __init__(self, window=1):
        self.window = window

    def title(self):
        return "AnimateDiff"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def process(self, p, *args):
        frames, window = p.batch_size, self.window

        def on_cfg_denoiser(params):
            inner = params.denoiser.inner_model
            if params.denoiser.step == 0 and not hasattr(inner, "original_forward"):
                inner.original_forward = inner.forward
                inner.forward = lambda x, sigma, cond: mm_sd_forward(inner, x, sigma, cond, frames, window)

        self.callback = on_cfg_denoiser
        script_callbacks.on_cfg_denoiser(on_cfg_denoiser)

    def postprocess(self, p, processed, *args):
        script_callbacks.remove_callbacks_for_function(self.callback)
