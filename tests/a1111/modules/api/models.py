"""Mirrors modules/api/models.py (v1.10.1): the txt2img request model."""

from __future__ import annotations

import dataclasses
from typing import Any

from pydantic import create_model

from modules.processing import StableDiffusionProcessingTxt2Img

API_NOT_ALLOWED = {"self", "kwargs", "sd_model", "outpath_samples", "outpath_grids", "sampler_index", "extra_generation_params"}


def generate_model(name: str, processing_class: type, additional_fields: list[tuple[str, Any, Any]]) -> type:
    """Mirrors PydanticModelGenerator(...).generate_model() (v1.10.1): a field for each ``__init__``
    parameter of the processing class (here the stand-in's, typed ``Any | None`` where the host uses
    ``Optional`` of the annotation) with its default, less ``API_NOT_ALLOWED``, then the API's own
    fields with their types (``str | None`` where the host's pydantic 1 lets a ``str`` field with a
    ``None`` default take ``null``). Keys a request adds are ignored (pydantic's default)."""
    fields = {f.name: (Any | None, f.default) for f in dataclasses.fields(processing_class) if f.init and f.name not in API_NOT_ALLOWED}
    fields.update({key: (kind, default) for key, kind, default in additional_fields})
    return create_model(name, **fields)


StableDiffusionTxt2ImgProcessingAPI = generate_model(
    "StableDiffusionProcessingTxt2Img",
    StableDiffusionProcessingTxt2Img,
    [
        ("sampler_index", str, "Euler"),
        ("script_name", str | None, None),
        ("script_args", list, []),
        ("send_images", bool, True),
        ("save_images", bool, False),
        ("alwayson_scripts", dict, {}),
        ("force_task_id", str | None, None),
        ("infotext", str | None, None),
    ],
)
