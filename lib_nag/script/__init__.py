"""The script's parts: the NAG accordion (``ui``), the XYZ-plot axes (``xyz``) and the API routes'
check of a request's NAG entry (``api_check``)."""
