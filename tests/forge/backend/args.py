"""Stand-in of Forge Neo's ``backend/args.py``: only ``dynamic_args``, the process-global settings
the Flux model reads its Kontext reference latents from (``dynamic_args.get("ref_latents")``)."""

dynamic_args: dict = {}
