"""Mirrors the modules/api package (v1.10.1); ``modules.api.init_script_args`` re-exports ``modules.api.api``'s."""

from modules.api.api import Api, HTTPException, handle_exception, init_script_args

__all__ = ["Api", "HTTPException", "handle_exception", "init_script_args"]
