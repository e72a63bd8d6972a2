"""The API's txt2img and img2img routes answer 422 to a request whose ``alwayson_scripts`` NAG entry
the WebUI would drop without a word.

Every host (A1111 1.6–1.10.1 ``82a973c0``, Forge ``dfdcbab6``, reForge ``3b56b268``, Forge Classic,
Forge Neo 2.26) builds a request's script arguments in ``Api.init_script_args``, which copies
``alwayson_scripts[title]["args"]`` only when ``"args" in entry``: a bare list (``{"NAG": [true, 7]}``)
or a dict of NAG's values (``{"NAG": {"enabled": true}}``) is skipped, the job runs with NAG's
defaults (off), and NAG never sees the request. So NAG looks at the request body before the route
does.

``install`` runs in ``on_app_started``. All these hosts call it after ``create_api`` (with ``--api``
or ``--nowebui``; without them there are no routes and nothing is done), on a server that may
already be answering. It wraps the ASGI app of the two POST routes and touches nothing else: no
middleware (Starlette 0.24+ refuses ``add_middleware`` once the app has served a request, and the
hosts' Gradio launch already has), no other route, no request that goes elsewhere. The wrapper
reads the body and hands the route exactly the messages it read, in order, then the live
``receive``; for a malformed NAG entry it raises FastAPI's ``HTTPException(422)`` before the
endpoint runs, and the host's exception handler answers it as it answers its own 422s. It runs
before the route's dependencies, so with ``--api-auth`` such a request gets the 422 without
credentials.
"""

from __future__ import annotations

import email.message
import json
from collections import deque
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from fastapi import HTTPException

from ..params import ARG_ORDER

ROUTES = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
TITLE = "NAG"  # the script's title; the host matches alwayson_scripts keys to titles in lower case
FORM = '{"args": [' + ", ".join(ARG_ORDER) + ']} or {"args": [{"enabled": true, ...}]}'

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]


def _kind(value: Any) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bool) or value is None:
        return json.dumps(value)
    return "a number"


def entry_problem(entry: Any) -> str:
    """Why the host would not pass this NAG entry's arguments on ("" when it would). ``{}`` is fine:
    it names NAG without arguments, which reads as off like leaving NAG out."""
    if isinstance(entry, dict):
        if "args" not in entry:
            return "" if not entry else f'an object without "args" (keys {", ".join(sorted(map(str, entry)))})'
        return "" if isinstance(entry["args"], list) else f'an object whose "args" is {_kind(entry["args"])}'
    return _kind(entry)


def request_problem(content_type: str | None, body: bytes) -> str:
    """The 422 detail for a txt2img/img2img request body ("" for anything NAG leaves to the host).

    The body is read as the hosts' FastAPI (0.94 to 0.127) reads it: JSON when there is no
    content type or it is ``application/json`` or ``application/*+json``. A body that is not JSON,
    not an object, or whose ``alwayson_scripts`` is not an object, is the route's to answer."""
    if not body or not _is_json(content_type):
        return ""
    try:
        request = json.loads(body)
    except (ValueError, RecursionError):  # the route's to answer, as without NAG
        return ""
    scripts = request.get("alwayson_scripts") if isinstance(request, dict) else None
    if not isinstance(scripts, dict):
        return ""
    for key, entry in scripts.items():
        problem = entry_problem(entry) if key.lower() == TITLE.lower() else ""
        if problem:
            return (
                f'NAG: alwayson_scripts["{key}"] must be {FORM}; got {problem}. '
                "The WebUI reads a script's arguments only from that form, so NAG would not run."
            )
    return ""


def _is_json(content_type: str | None) -> bool:
    if not content_type:
        return True
    message = email.message.Message()
    message["content-type"] = content_type
    subtype = message.get_content_subtype()
    return message.get_content_maintype() == "application" and (subtype == "json" or subtype.endswith("+json"))


class NagEntryCheck:
    """The ASGI app around one API route's app (see the module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        messages: deque[Message] = deque()
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request" or not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        content_type = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k.lower() == b"content-type"), None)
        problem = request_problem(content_type, body)
        if problem:
            raise HTTPException(status_code=422, detail=problem)

        async def replay() -> Message:
            return messages.popleft() if messages else await receive()

        await self.app(scope, replay, send)


def install(_demo: Any, app: Any) -> None:
    """``on_app_started``: wrap the app's POST routes in ``ROUTES`` (once)."""
    for route in app.router.routes:
        ours = getattr(route, "path", None) in ROUTES and "POST" in (getattr(route, "methods", None) or ())
        if ours and not isinstance(route.app, NagEntryCheck):
            route.app = NagEntryCheck(route.app)
