"""NAG, Normalized Attention Guidance: the WebUI script. All the work is in ``lib_nag``."""

import modules.scripts as scripts
from modules import script_callbacks

from lib_nag.hosts import HOST
from lib_nag.script import api_check, ui, xyz


class NagScript(scripts.Script):
    def title(self):
        return "NAG"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        return ui.build(self)

    def process(self, p, *args):
        HOST.start_job(p, args)

    if hasattr(scripts.Script, "process_before_every_sampling"):  # A1111 1.10+, Forge

        def process_before_every_sampling(self, p, *args, **kwargs):
            HOST.start_pass(p)

    else:  # A1111 1.6–1.9: the first pass after extra networks, the hires pass before it runs

        def process_batch(self, p, *args, **kwargs):
            HOST.start_pass(p)

        def before_hr(self, p, *args):
            HOST.start_pass(p)

    def postprocess(self, p, processed, *args):
        HOST.end_job(p)


script_callbacks.on_before_ui(xyz.register_axes)
script_callbacks.on_script_unloaded(HOST.unload)
script_callbacks.on_app_started(api_check.install)
