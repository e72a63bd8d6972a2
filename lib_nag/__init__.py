"""sd-webui-nag: Normalized Attention Guidance for the A1111 and Forge WebUIs.

The modules directly in this package are host-independent (torch only). Host adapters live
in ``lib_nag.hosts`` and are the only code that imports the WebUI.
"""
