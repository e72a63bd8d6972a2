"""Mirrors modules/sd_samplers_cfg_denoiser.py (v1.10.1): the classifier-free-guidance denoiser."""

from __future__ import annotations

import torch

from modules import prompt_parser, sd_samplers_common, shared
from modules.script_callbacks import (
    AfterCFGCallbackParams,
    CFGDenoisedParams,
    CFGDenoiserParams,
    cfg_after_cfg_callback,
    cfg_denoised_callback,
    cfg_denoiser_callback,
)
from modules.shared import opts, state


def catenate_conds(conds):
    """Mirrors sd_samplers_cfg_denoiser.catenate_conds (v1.10.1): dim-0 cat; dicts give a plain dict."""
    if not isinstance(conds[0], dict):
        return torch.cat(conds)
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def subscript_cond(cond, a, b):
    """Mirrors sd_samplers_cfg_denoiser.subscript_cond (v1.10.1)."""
    return {key: v[a:b] for key, v in cond.items()} if isinstance(cond, dict) else cond[a:b]


def pad_cond(tensor, repeats, empty):
    """Mirrors sd_samplers_cfg_denoiser.pad_cond (v1.10.1): append ``empty`` chunks; dicts are padded in place."""
    if not isinstance(tensor, dict):
        return torch.cat([tensor, empty.repeat((tensor.shape[0], repeats, 1))], dim=1)
    tensor["crossattn"] = pad_cond(tensor["crossattn"], repeats, empty)
    return tensor


def _repeat_rows(t: torch.Tensor, repeats: list[int]) -> list[torch.Tensor]:
    """Row ``i`` of ``t`` stacked ``repeats[i]`` times, per image (the cond-row layout)."""
    return [torch.stack([t[i]] * n) for i, n in enumerate(repeats)]


class CFGDenoiser(torch.nn.Module):
    """Mirrors sd_samplers_cfg_denoiser.CFGDenoiser (v1.10.1)."""

    def __init__(self, sampler):
        super().__init__()
        self.model_wrap = self.mask = self.nmask = self.init_latent = None
        self.steps = self.total_steps = None
        self.step = 0
        self.image_cfg_scale = None
        self.padded_cond_uncond = self.padded_cond_uncond_v0 = False
        self.sampler = sampler
        self.p = None
        self.cond_scale_miltiplier = 1.0
        self.need_last_noise_uncond = False
        self.last_noise_uncond = None
        self.mask_before_denoising = False

    @property
    def inner_model(self):
        raise NotImplementedError()

    def combine_denoised(self, x_out, conds_list, uncond, cond_scale):
        """Mirrors CFGDenoiser.combine_denoised (v1.10.1): uncond rows last, AND-weighted cond deltas."""
        denoised_uncond = x_out[-uncond.shape[0] :]
        denoised = torch.clone(denoised_uncond)
        for i, conds in enumerate(conds_list):
            for cond_index, weight in conds:
                denoised[i] += (x_out[cond_index] - denoised_uncond[i]) * (weight * cond_scale)
        return denoised

    def combine_denoised_for_edit_model(self, x_out, cond_scale):
        """Mirrors CFGDenoiser.combine_denoised_for_edit_model (v1.10.1)."""
        out_cond, out_img_cond, out_uncond = x_out.chunk(3)
        return out_uncond + cond_scale * (out_cond - out_img_cond) + self.image_cfg_scale * (out_img_cond - out_uncond)

    def get_pred_x0(self, x_in, x_out, sigma):
        """Mirrors CFGDenoiser.get_pred_x0 (v1.10.1)."""
        return x_out

    def update_inner_model(self):
        """Mirrors CFGDenoiser.update_inner_model (v1.10.1): rebuild the wrapper, re-read the conds."""
        self.model_wrap = None
        c, uc = self.p.get_conds()
        self.sampler.sampler_extra_args["cond"] = c
        self.sampler.sampler_extra_args["uncond"] = uc

    def pad_cond_uncond(self, cond, uncond):
        """Mirrors CFGDenoiser.pad_cond_uncond (v1.10.1): pad the shorter side with whole empty-prompt chunks."""
        empty = shared.sd_model.cond_stage_model_empty_prompt
        num_repeats = (cond.shape[1] - uncond.shape[1]) // empty.shape[1]
        if num_repeats < 0:
            cond = pad_cond(cond, -num_repeats, empty)
            self.padded_cond_uncond = True
        elif num_repeats > 0:
            uncond = pad_cond(uncond, num_repeats, empty)
            self.padded_cond_uncond = True
        return cond, uncond

    def pad_cond_uncond_v0(self, cond, uncond):
        """Mirrors CFGDenoiser.pad_cond_uncond_v0 (v1.10.1): repeat uncond's last token, or truncate it."""
        is_dict = isinstance(uncond, dict)
        vec = uncond["crossattn"] if is_dict else uncond
        if vec.shape[1] < cond.shape[1]:
            vec = torch.hstack([vec, vec[:, -1:].repeat([1, cond.shape[1] - vec.shape[1], 1])])
            self.padded_cond_uncond_v0 = True
        elif vec.shape[1] > cond.shape[1]:
            vec = vec[:, : cond.shape[1]]
            self.padded_cond_uncond_v0 = True
        if is_dict:
            uncond["crossattn"] = vec
        else:
            uncond = vec
        return cond, uncond

    def forward(self, x, sigma, uncond, cond, cond_scale, s_min_uncond, image_cond):
        """Mirrors CFGDenoiser.forward (v1.10.1)."""
        if state.interrupted or state.skipped:
            raise sd_samplers_common.InterruptedException
        if sd_samplers_common.apply_refiner(self, sigma):
            cond, uncond = self.sampler.sampler_extra_args["cond"], self.sampler.sampler_extra_args["uncond"]

        is_edit_model = shared.sd_model.cond_stage_key == "edit" and self.image_cfg_scale is not None and self.image_cfg_scale != 1.0
        conds_list, tensor = prompt_parser.reconstruct_multicond_batch(cond, self.step)
        uncond = prompt_parser.reconstruct_cond_batch(uncond, self.step)
        assert not is_edit_model or all(len(conds) == 1 for conds in conds_list), "AND is not supported for InstructPix2Pix checkpoint"

        def apply_blend(current_latent):
            blended = current_latent * self.nmask + self.init_latent * self.mask
            if self.p.scripts is not None:
                from modules import scripts

                mba = scripts.MaskBlendArgs(current_latent, self.nmask, self.init_latent, self.mask, blended, denoiser=self, sigma=sigma)
                self.p.scripts.on_mask_blend(self.p, mba)
                blended = mba.blended_latent
            return blended

        if self.mask_before_denoising and self.mask is not None:
            x = apply_blend(x)

        batch_size = len(conds_list)
        repeats = [len(conds) for conds in conds_list]
        if shared.sd_model.model.conditioning_key == "crossattn-adm":
            image_uncond = torch.zeros_like(image_cond)

            def make_condition_dict(c_crossattn, c_adm):
                return {"c_crossattn": [c_crossattn], "c_adm": c_adm}
        else:
            image_uncond, sgm_conds = image_cond, isinstance(uncond, dict)  # chosen before the callback, as in the host

            def make_condition_dict(c_crossattn, c_concat):
                if sgm_conds:
                    return {**c_crossattn, "c_concat": [c_concat]}
                return {"c_crossattn": [c_crossattn], "c_concat": [c_concat]}

        extra_x = [x, x] if is_edit_model else [x]
        x_in = torch.cat(_repeat_rows(x, repeats) + extra_x)
        sigma_in = torch.cat(_repeat_rows(sigma, repeats) + ([sigma, sigma] if is_edit_model else [sigma]))
        image_tail = [image_uncond, torch.zeros_like(self.init_latent)] if is_edit_model else [image_uncond]
        image_cond_in = torch.cat(_repeat_rows(image_cond, repeats) + image_tail)

        params = CFGDenoiserParams(x_in, image_cond_in, sigma_in, state.sampling_step, state.sampling_steps, tensor, uncond, self)
        cfg_denoiser_callback(params)
        x_in, image_cond_in, sigma_in = params.x, params.image_cond, params.sigma
        tensor, uncond = params.text_cond, params.text_uncond
        skip_uncond = False

        if opts.skip_early_cond != 0.0 and self.step / self.total_steps <= opts.skip_early_cond:
            skip_uncond = True
            self.p.extra_generation_params["Skip Early CFG"] = opts.skip_early_cond
        elif (self.step % 2 or opts.s_min_uncond_all) and s_min_uncond > 0 and sigma[0] < s_min_uncond and not is_edit_model:
            skip_uncond = True
            self.p.extra_generation_params["NGMS"] = s_min_uncond
            if opts.s_min_uncond_all:
                self.p.extra_generation_params["NGMS all steps"] = opts.s_min_uncond_all
        if skip_uncond:  # image_cond_in keeps its uncond rows, as in the host
            x_in, sigma_in = x_in[:-batch_size], sigma_in[:-batch_size]

        self.padded_cond_uncond = self.padded_cond_uncond_v0 = False
        if opts.pad_cond_uncond_v0 and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond_v0(tensor, uncond)
        elif opts.pad_cond_uncond and tensor.shape[1] != uncond.shape[1]:
            tensor, uncond = self.pad_cond_uncond(tensor, uncond)

        if tensor.shape[1] == uncond.shape[1] or skip_uncond:
            if is_edit_model:
                cond_in = catenate_conds([tensor, uncond, uncond])
            else:
                cond_in = tensor if skip_uncond else catenate_conds([tensor, uncond])
            if opts.batch_cond_uncond:
                x_out = self.inner_model(x_in, sigma_in, cond=make_condition_dict(cond_in, image_cond_in))
            else:
                x_out = torch.zeros_like(x_in)
                for a in range(0, x_out.shape[0], batch_size):
                    b = a + batch_size
                    x_out[a:b] = self.inner_model(
                        x_in[a:b], sigma_in[a:b], cond=make_condition_dict(subscript_cond(cond_in, a, b), image_cond_in[a:b])
                    )
        else:
            x_out = torch.zeros_like(x_in)
            step = batch_size * 2 if opts.batch_cond_uncond else batch_size
            for a in range(0, tensor.shape[0], step):
                b = min(a + step, tensor.shape[0])
                # the host's edit-model branch passes ``uncond`` as torch.cat's dim (a host bug, kept)
                c_crossattn = torch.cat([tensor[a:b]], uncond) if is_edit_model else subscript_cond(tensor, a, b)
                x_out[a:b] = self.inner_model(x_in[a:b], sigma_in[a:b], cond=make_condition_dict(c_crossattn, image_cond_in[a:b]))
            if not skip_uncond:
                n = uncond.shape[0]
                x_out[-n:] = self.inner_model(x_in[-n:], sigma_in[-n:], cond=make_condition_dict(uncond, image_cond_in[-n:]))

        denoised_image_indexes = [conds[0][0] for conds in conds_list]
        if skip_uncond:  # the first cond row of each image stands in for its uncond
            x_out = torch.cat([x_out, torch.cat([x_out[i : i + 1] for i in denoised_image_indexes])])

        cfg_denoised_callback(CFGDenoisedParams(x_out, state.sampling_step, state.sampling_steps, self.inner_model))
        if self.need_last_noise_uncond:
            self.last_noise_uncond = torch.clone(x_out[-uncond.shape[0] :])

        if is_edit_model:
            denoised = self.combine_denoised_for_edit_model(x_out, cond_scale * self.cond_scale_miltiplier)
        elif skip_uncond:
            denoised = self.combine_denoised(x_out, conds_list, uncond, 1.0)
        else:
            denoised = self.combine_denoised(x_out, conds_list, uncond, cond_scale * self.cond_scale_miltiplier)
        if not self.mask_before_denoising and self.mask is not None:
            denoised = apply_blend(denoised)

        first_rows = torch.cat([x_in[i : i + 1] for i in denoised_image_indexes])
        self.sampler.last_latent = self.get_pred_x0(first_rows, torch.cat([x_out[i : i + 1] for i in denoised_image_indexes]), sigma)
        if opts.live_preview_content == "Prompt":
            preview = self.sampler.last_latent
        elif opts.live_preview_content == "Negative prompt":
            preview = self.get_pred_x0(x_in[-uncond.shape[0] :], x_out[-uncond.shape[0] :], sigma)
        else:
            preview = self.get_pred_x0(first_rows, torch.cat([denoised[i : i + 1] for i in denoised_image_indexes]), sigma)
        sd_samplers_common.store_latent(preview)

        after = AfterCFGCallbackParams(denoised, state.sampling_step, state.sampling_steps)
        cfg_after_cfg_callback(after)
        denoised = after.x
        self.step += 1
        return denoised
