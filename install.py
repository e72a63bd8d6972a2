"""Run by the WebUI at start-up. NAG needs nothing the WebUI does not already ship (torch and
gradio), so this installs nothing; it only says so if the host lacks them."""

from importlib.util import find_spec

missing = [name for name in ("torch", "gradio") if find_spec(name) is None]
if missing:
    print(f"[NAG] this WebUI lacks {', '.join(missing)}; NAG will not load")
