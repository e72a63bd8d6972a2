"""The model families NAG runs, one module each, and their registry (``registry.FAMILIES``).

A family module says which diffusion models it recognises and how NAG runs on them in each host,
as a ``webui.family.ModelFamily`` named ``FAMILY``: its pass per host is a ``webui.passes`` pass
(``CrossAttentionPass`` or ``ModelPass``) combined with that host's row placement
(``webui.a1111_rows.DenoiserPlacement``, ``webui.forge_patcher.ClonedPatcher`` or ``ForgeModelPass``).

To add a family: write ``models/<family>.py`` ending in ``FAMILY = ModelFamily(...)``, add it to
``registry.FAMILIES`` (before ``unet``, which takes any model with cross-attention layers), and test
it on a stand-in of the host's model code under ``tests/``. No host module changes.
"""
