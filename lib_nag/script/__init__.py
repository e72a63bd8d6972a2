"""The script's parts: the NAG accordion (``ui``) and the XYZ-plot axes (``xyz``)."""
