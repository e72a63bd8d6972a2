"""Gradio 4.40's component defaults, over the Gradio 3.41 the tests install (see README.md).

Forge (main ``dfdcbab6``) and Forge Neo pin ``gradio==4.40.0``; A1111 1.6–1.10 and reForge pin
3.41.2. Read in gradio 4.40.0: ``components/base.py`` ``Component.__init__`` stores
``self.value = self.postprocess(initial_value)``. Against 3.41.2, the one constructor default that
differs among the components an extension uses is ``Textbox(value=None)`` (3.41: ``value=""``),
and ``Textbox.postprocess(None)`` is ``None``. The others agree: ``Slider`` (``None`` → minimum),
``Dropdown`` and ``Radio`` (``None``), ``Checkbox`` (``False``). So an empty textbox built without
a value is ``None`` in Gradio 4: that is what the API hands a script for a request that leaves it
out, and what ``connect_paste`` coerces pasted text to (``type(None)(text)`` fails: nothing pasted).
"""

import gradio as gr


def use_gradio4_defaults(monkeypatch) -> None:
    """Make ``gr.Textbox`` built without a ``value`` hold ``None``, as in Gradio 4.40."""
    build = gr.Textbox.__init__

    def textbox(self, *args, **kwargs):
        build(self, *args, **kwargs)
        if not args and "value" not in kwargs:
            self.value = None

    monkeypatch.setattr(gr.Textbox, "__init__", textbox)
