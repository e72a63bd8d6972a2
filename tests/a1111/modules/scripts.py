"""Mirrors modules/scripts.py (v1.10.1): the Script base class and the ScriptRunner hook dispatch."""

from __future__ import annotations

import os
import re
from collections import namedtuple

from modules import errors, script_callbacks

AlwaysVisible = object()
ScriptClassData = namedtuple("ScriptClassData", ["script_class", "path", "basedir", "module"])
scripts_data: list[ScriptClassData] = []


class MaskBlendArgs:
    """Mirrors scripts.MaskBlendArgs (v1.10.1)."""

    def __init__(self, current_latent, nmask, init_latent, mask, blended_latent, denoiser=None, sigma=None):
        self.current_latent, self.nmask, self.init_latent, self.mask = current_latent, nmask, init_latent, mask
        self.blended_latent, self.denoiser, self.sigma = blended_latent, denoiser, sigma
        self.is_final_blend = denoiser is None


class PostSampleArgs:
    """Mirrors scripts.PostSampleArgs (v1.10.1)."""

    def __init__(self, samples):
        self.samples = samples


class PostprocessBatchListArgs:
    """Mirrors scripts.PostprocessBatchListArgs (v1.10.1)."""

    def __init__(self, images):
        self.images = images


class PostprocessImageArgs:
    """Mirrors scripts.PostprocessImageArgs (v1.10.1)."""

    def __init__(self, image):
        self.image = image


class Script:
    """Mirrors scripts.Script (v1.10.1): every hook below is a no-op that the runner skips unless a subclass overrides it."""

    name = section = filename = args_from = args_to = None
    alwayson = is_txt2img = is_img2img = False
    tabname = group = infotext_fields = paste_field_names = api_info = controls = None
    setup_for_ui_only = False

    def title(self):
        raise NotImplementedError()

    def ui(self, is_img2img): ...
    def show(self, is_img2img):
        return True

    def run(self, p, *args): ...
    def setup(self, p, *args): ...
    def before_process(self, p, *args): ...
    def process(self, p, *args): ...
    def before_process_batch(self, p, *args, **kwargs): ...
    def after_extra_networks_activate(self, p, *args, **kwargs): ...
    def process_before_every_sampling(self, p, *args, **kwargs): ...
    def process_batch(self, p, *args, **kwargs): ...
    def postprocess_batch(self, p, *args, **kwargs): ...
    def postprocess_batch_list(self, p, pp, *args, **kwargs): ...
    def postprocess_image(self, p, pp, *args): ...
    def on_mask_blend(self, p, mba, *args): ...
    def post_sample(self, p, ps, *args): ...
    def postprocess(self, p, processed, *args): ...
    def before_hr(self, p, *args): ...

    def elem_id(self, item_id):
        """Mirrors Script.elem_id (v1.10.1)."""
        need_tabname = self.show(True) == self.show(False)
        tabname = f"{'img2img' if self.is_img2img else 'txt2img'}_" if need_tabname else ""
        title = re.sub(r"[^a-z_0-9]", "", re.sub(r"\s", "_", self.title().lower()))
        return f"script_{tabname}{title}_{item_id}"


class ScriptRunner:
    """Mirrors scripts.ScriptRunner (v1.10.1): alwayson scripts only; a failing hook is reported, never raised."""

    def __init__(self):
        self.scripts, self.selectable_scripts, self.alwayson_scripts = [], [], []
        self.titles, self.infotext_fields, self.paste_field_names = [], [], []
        self.inputs = [None]
        self.callback_map = {}

    def initialize_scripts(self, is_img2img):
        """Mirrors ScriptRunner.initialize_scripts (v1.10.1): instantiate ``scripts_data``."""
        for script_list in (self.scripts, self.alwayson_scripts, self.selectable_scripts):
            script_list.clear()
        for script_data in scripts_data:
            try:
                script = script_data.script_class()
            except Exception:
                errors.report(f"Error # failed to initialize Script {script_data.module}: ", exc_info=True)
                continue
            script.filename = script_data.path
            script.is_txt2img, script.is_img2img = not is_img2img, is_img2img
            script.tabname = "img2img" if is_img2img else "txt2img"
            visibility = script.show(script.is_img2img)
            if visibility == AlwaysVisible:
                self.scripts.append(script)
                self.alwayson_scripts.append(script)
                script.alwayson = True
            elif visibility:
                self.scripts.append(script)
                self.selectable_scripts.append(script)
        self.callback_map.clear()

    def create_script_ui(self, script):
        """Mirrors ScriptRunner.create_script_ui (v1.10.1): ``args_from``/``args_to`` over ``inputs``."""
        script.args_from = script.args_to = len(self.inputs)
        try:
            controls = script.controls = script.ui(script.is_img2img)
            if controls is None:
                return
            script.name = script.title().lower()
            self.infotext_fields += script.infotext_fields or []
            self.paste_field_names += script.paste_field_names or []
            self.inputs += controls
            script.args_to = len(self.inputs)
        except Exception:
            errors.report(f"Error creating UI for {script.name}: ", exc_info=True)

    def setup_ui(self):
        """Mirrors ScriptRunner.setup_ui (v1.10.1), reduced to building every script's controls."""
        self.titles = [s.title() for s in self.selectable_scripts]
        for script in self.scripts:
            self.create_script_ui(script)
        return self.inputs

    def list_scripts_for_method(self, method_name):
        return self.alwayson_scripts

    def ordered_callbacks(self, method_name, *, enable_user_sort=True):
        """Mirrors ScriptRunner.ordered_callbacks (v1.10.1): overriding scripts only, cached by list length."""
        script_list = self.list_scripts_for_method(method_name)
        category = f"script_{method_name}"
        length, callbacks = self.callback_map.get(category, (-1, None))
        if callbacks is None or length != len(script_list):
            callbacks = []
            for script in script_list:
                if getattr(script.__class__, method_name, None) == getattr(Script, method_name, None):
                    continue
                script_callbacks.add_callback(
                    callbacks, script, category=category, name=script.__class__.__name__, filename=script.filename
                )
            callbacks = script_callbacks.sort_callbacks(category, callbacks, enable_user_sort=enable_user_sort)
            self.callback_map[category] = len(script_list), callbacks
        return callbacks

    def ordered_scripts(self, method_name):
        return [x.callback for x in self.ordered_callbacks(method_name)]

    def _call(self, method_name, p, *before, **kwargs):
        """Run ``script.<method_name>(p, *before, *script_args, **kwargs)`` for each overriding script."""
        for script in self.ordered_scripts(method_name):
            try:
                script_args = p.script_args[script.args_from : script.args_to]
                getattr(script, method_name)(p, *before, *script_args, **kwargs)
            except Exception:
                errors.report(f"Error running {method_name}: {script.filename}", exc_info=True)

    def setup_scrips(self, p, *, is_ui=True):
        """Mirrors ScriptRunner.setup_scrips (v1.10.1)."""
        for script in self.ordered_scripts("setup"):
            if not is_ui and script.setup_for_ui_only:
                continue
            try:
                script.setup(p, *p.script_args[script.args_from : script.args_to])
            except Exception:
                errors.report(f"Error running setup: {script.filename}", exc_info=True)

    def run(self, p, *args):
        """Mirrors ScriptRunner.run (v1.10.1): the selected (non-alwayson) script, if any."""
        script_index = args[0]
        if script_index == 0 or script_index is None:
            return None
        script = self.selectable_scripts[script_index - 1]
        return script.run(p, *args[script.args_from : script.args_to])

    def before_process(self, p):
        """Mirrors ScriptRunner.before_process (v1.10.1)."""
        self._call("before_process", p)

    def process(self, p):
        """Mirrors ScriptRunner.process (v1.10.1)."""
        self._call("process", p)

    def process_before_every_sampling(self, p, **kwargs):
        """Mirrors ScriptRunner.process_before_every_sampling (v1.10.1): kwargs x, noise, c, uc."""
        self._call("process_before_every_sampling", p, **kwargs)

    def before_process_batch(self, p, **kwargs):
        """Mirrors ScriptRunner.before_process_batch (v1.10.1)."""
        self._call("before_process_batch", p, **kwargs)

    def after_extra_networks_activate(self, p, **kwargs):
        """Mirrors ScriptRunner.after_extra_networks_activate (v1.10.1)."""
        self._call("after_extra_networks_activate", p, **kwargs)

    def process_batch(self, p, **kwargs):
        """Mirrors ScriptRunner.process_batch (v1.10.1)."""
        self._call("process_batch", p, **kwargs)

    def post_sample(self, p, ps):
        """Mirrors ScriptRunner.post_sample (v1.10.1)."""
        self._call("post_sample", p, ps)

    def on_mask_blend(self, p, mba):
        """Mirrors ScriptRunner.on_mask_blend (v1.10.1)."""
        self._call("on_mask_blend", p, mba)

    def postprocess_batch(self, p, images, **kwargs):
        """Mirrors ScriptRunner.postprocess_batch (v1.10.1): ``images`` is passed as a keyword."""
        self._call("postprocess_batch", p, images=images, **kwargs)

    def postprocess_image(self, p, pp):
        """Mirrors ScriptRunner.postprocess_image (v1.10.1): per image, after postprocess_batch_list."""
        self._call("postprocess_image", p, pp)

    def postprocess_batch_list(self, p, pp, **kwargs):
        """Mirrors ScriptRunner.postprocess_batch_list (v1.10.1)."""
        self._call("postprocess_batch_list", p, pp, **kwargs)

    def before_hr(self, p):
        """Mirrors ScriptRunner.before_hr (v1.10.1)."""
        self._call("before_hr", p)

    def postprocess(self, p, processed):
        """Mirrors ScriptRunner.postprocess (v1.10.1)."""
        self._call("postprocess", p, processed)


def basedir():
    """Mirrors scripts.basedir (v1.10.1) as the current directory."""
    return os.getcwd()


scripts_txt2img: ScriptRunner | None = None
scripts_img2img: ScriptRunner | None = None
