"""Stand-in of Forge Neo's ``backend.diffusion_engine``: the prompt side of its Flux engines (see tests/forge/README.md)."""
