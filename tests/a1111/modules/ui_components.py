"""Mirrors modules/ui_components.py (v1.6–v1.10): the parts extensions use."""

import gradio as gr


class InputAccordion(gr.Checkbox):
    """Mirrors ui_components.InputAccordion: a hidden checkbox that holds the enabled state (its
    value, a bool) and an accordion, opened with it, that the ``with`` block fills."""

    global_index = 0

    def __init__(self, value, **kwargs):
        self.accordion_id = kwargs.get("elem_id") or f"input-accordion-{InputAccordion.global_index}"
        InputAccordion.global_index += 1
        super().__init__(value, **{**kwargs, "elem_id": f"{self.accordion_id}-checkbox", "visible": False})
        accordion = {**kwargs, "elem_id": self.accordion_id, "label": kwargs.get("label", "Accordion"), "open": value}
        self.accordion = gr.Accordion(**accordion, elem_classes=["input-accordion"])

    def __enter__(self):
        self.accordion.__enter__()
        return self

    def __exit__(self, exc_type, exc_val, exc_tb):
        self.accordion.__exit__(exc_type, exc_val, exc_tb)

    def get_block_name(self):
        return "checkbox"
