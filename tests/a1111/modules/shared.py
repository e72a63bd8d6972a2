"""Mirrors modules/shared.py (v1.10.1): the process-wide ``opts``, ``state``, ``cmd_opts`` and ``sd_model``."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

OPTION_DEFAULTS: dict[str, Any] = {
    "batch_cond_uncond": True,
    "pad_cond_uncond": False,
    "pad_cond_uncond_v0": False,
    "skip_early_cond": 0.0,
    "s_min_uncond": 0.0,
    "s_min_uncond_all": False,
    "s_churn": 0.0,
    "s_tmin": 0.0,
    "s_tmax": 0.0,
    "s_noise": 1.0,
    "eta_ancestral": 1.0,
    "eta_ddim": 0.0,
    "always_discard_next_to_last_sigma": False,
    "persistent_cond_cache": True,
    "use_old_scheduling": False,
    "CLIP_stop_at_last_layers": 1,
    "sdxl_crop_left": 0,
    "sdxl_crop_top": 0,
    "sdxl_refiner_low_aesthetic_score": 2.5,
    "sdxl_refiner_high_aesthetic_score": 6.0,
    "fp8_storage": "Disable",
    "cache_fp16_weight": False,
    "emphasis": "Original",
    "refiner_switch_by_sample_steps": False,
    "hires_fix_refiner_pass": "second pass",
    "hires_fix_use_firstpass_conds": False,
    "live_preview_content": "Prompt",
    "img2img_fix_steps": False,
    "sgm_noise_multiplier": False,
    "initial_noise_multiplier": 1.0,
    "enable_quantization": False,
    "sd_model_checkpoint": None,
    "infotext_skip_pasting": [],
}


class Options:
    """Mirrors modules/options.py Options (v1.10.1): attribute access over the ``data`` dict."""

    def __init__(self, defaults: dict[str, Any]) -> None:
        object.__setattr__(self, "defaults", dict(defaults))
        object.__setattr__(self, "data", {k: (list(v) if isinstance(v, list) else v) for k, v in defaults.items()})

    def __getattr__(self, item: str) -> Any:
        data = object.__getattribute__(self, "data")
        if item in data:
            return data[item]
        raise AttributeError(item)

    def __setattr__(self, key: str, value: Any) -> None:
        self.data[key] = value

    def set(self, key: str, value: Any, is_api: bool = False, run_callbacks: bool = True) -> bool:
        """Mirrors Options.set (v1.10.1), without validation or onchange callbacks."""
        self.data[key] = value
        return True

    def get_default(self, key: str) -> Any:
        """Mirrors Options.get_default (v1.10.1)."""
        return self.defaults.get(key)


class State:
    """Mirrors modules/shared_state.py State (v1.10.1), reduced to what processing and sampling touch."""

    def __init__(self) -> None:
        self.begin()

    def begin(self, job: str = "(unknown)") -> None:
        """Mirrors State.begin (v1.10.1): clear the flags and counters for a new job."""
        self.interrupted = self.skipped = self.stopping_generation = False
        self.job, self.job_count, self.job_no, self.job_timestamp = job, 0, 0, "20240101000000"
        self.sampling_step = self.sampling_steps = 0
        self.processing_has_refined_job_count = False
        self.current_latent = None

    def interrupt(self) -> None:
        """Mirrors State.interrupt (v1.10.1)."""
        self.interrupted = True

    def skip(self) -> None:
        """Mirrors State.skip (v1.10.1)."""
        self.skipped = True

    def nextjob(self) -> None:
        """Mirrors State.nextjob (v1.10.1)."""
        self.job_no += 1
        self.sampling_step = 0


class TotalTQDM:
    """Mirrors modules/shared_total_tqdm.py TotalTQDM (v1.10.1) as a no-op progress bar."""

    def update(self) -> None: ...
    def updateTotal(self, new_total: int) -> None: ...
    def clear(self) -> None: ...


opts = Options(OPTION_DEFAULTS)
state = State()
total_tqdm = TotalTQDM()
cmd_opts = SimpleNamespace(no_prompt_history=True, hide_ui_dir_config=True, api_auth=None, lowvram=False, medvram=False)
sd_model: Any = None
device = "cpu"
latent_upscale_default_mode = "Latent"
latent_upscale_modes = {
    "Latent": {"mode": "bilinear", "antialias": False},
    "Latent (antialiased)": {"mode": "bilinear", "antialias": True},
    "Latent (nearest)": {"mode": "nearest", "antialias": False},
    "Latent (nearest-exact)": {"mode": "nearest-exact", "antialias": False},
}
