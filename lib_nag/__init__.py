"""sd-webui-nag: Normalized Attention Guidance for the A1111 and Forge WebUIs.

Layers, each importing only from the ones above it in this list:
1. the pure cores, directly in this package (torch only): ``guidance``, ``params``, ``schedule``,
   ``attention``, ``joint_attention``;
2. ``webui``: what NAG uses of the WebUI's sampling (a job and its passes, the report, the NAG
   negative, A1111's row placement, Forge's cloned patcher) and the contract of a model family;
3. ``models``: the model families, one module each, and their registry;
4. ``hosts``: AUTOMATIC1111 and the Forge family, which pick a family from the registry;
5. ``script``: the accordion and the XYZ axes; ``scripts/nag.py`` is the WebUI script.
"""
