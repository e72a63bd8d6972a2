"""NAG's check of the API's txt2img and img2img requests (lib_nag/script/api_check.py, issue 17): a
``NAG`` entry the host would drop without a word gets 422 naming the form; every other request, and
every other route, is left exactly as the host has it. Run on a FastAPI app with the A1111 stand-in's
API (tests/a1111/modules/api), installed the way the host does it: ``on_app_started`` after the routes."""

import asyncio
import json

import pytest
from fake_models import make_sd_model
from fastapi import FastAPI, Request
from harness import load, reset_host, ui_runner
from modules import script_callbacks, scripts
from modules.api import api
from starlette.testclient import TestClient
from test_a1111 import load_script_module

from lib_nag.script import api_check

NAG_ON = {"args": [{"enabled": True, "scale": 3, "negative_prompt": "glasses"}]}

MALFORMED = {
    "a bare list": ({"NAG": [True, 7.0]}, "got a list"),
    "a bare dict of values": ({"NAG": {"enabled": True, "scale": 7}}, 'got an object without "args" (keys enabled, scale)'),
    "args as a dict": ({"NAG": {"args": {"enabled": True}}}, 'got an object whose "args" is an object'),
    "args as a string": ({"NAG": {"args": "True"}}, 'got an object whose "args" is a string'),
    "args null": ({"NAG": {"args": None}}, 'got an object whose "args" is null'),
    "null": ({"NAG": None}, "got null"),
    "true": ({"NAG": True}, "got true"),
    "a number": ({"NAG": 1}, "got a number"),
    "a string": ({"NAG": "args"}, "got a string"),
    "the title in lower case": ({"nag": [True]}, 'alwayson_scripts["nag"]'),
    "beside a well-formed script": ({"Other": {"args": [1]}, "Nag": {"enabled": True}}, 'alwayson_scripts["Nag"]'),
}

LEFT_TO_THE_HOST = {
    "no alwayson_scripts": {},
    "another script only": {"alwayson_scripts": {"Other": {"args": [1]}}},
    "NAG well formed": {"alwayson_scripts": {"NAG": NAG_ON}},
    "NAG with positional args": {"alwayson_scripts": {"nag": {"args": [True, 5]}}},
    "NAG without args": {"alwayson_scripts": {"NAG": {}}},
    "NAG with args and another key": {"alwayson_scripts": {"NAG": {**NAG_ON, "note": 1}}},
    "NAG off": {"alwayson_scripts": {"NAG": {"args": [False]}}},
    "NAG on with a bad value": {"alwayson_scripts": {"NAG": {"args": [{"enabled": True, "tau": 0.5}]}}},
    "an unknown script": {"alwayson_scripts": {"Missing": {"args": []}}},
    "alwayson_scripts a list": {"alwayson_scripts": [["NAG", [True]]]},
    "another key named like NAG": {"alwayson_scripts": {"NAGx": [True]}},
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_nag_entry_is_named_with_the_form(case):
    entry, got = MALFORMED[case]
    problem = api_check.request_problem("application/json", json.dumps({"prompt": "a", "alwayson_scripts": entry}).encode())
    assert got in problem and api_check.FORM in problem


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8", "application/vnd.webui+json"])
def test_json_bodies_are_read_as_fastapi_reads_them(content_type):
    assert api_check.request_problem(content_type, b'{"alwayson_scripts": {"NAG": [true]}}')


@pytest.mark.parametrize(
    "content_type,body",
    [
        ("text/plain", b'{"alwayson_scripts": {"NAG": [true]}}'),  # FastAPI does not read it as JSON
        ("application/x-www-form-urlencoded", b'{"alwayson_scripts": {"NAG": [true]}}'),
        ("application/json", b'{"alwayson_scripts": {"NAG": [true]'),
        ("application/json", b'[{"alwayson_scripts": {"NAG": [true]}}]'),
        ("application/json", b"[" * 100_000),
        ("application/json", b"\xff"),
        ("application/json", b""),
        *(("application/json", json.dumps(body).encode()) for body in LEFT_TO_THE_HOST.values()),
    ],
)
def test_anything_else_is_left_to_the_host(content_type, body):
    assert api_check.request_problem(content_type, body) == ""


# --- the ASGI wrapper ---------------------------------------------------------------------------


class Recorder:
    """An ASGI app that reads its whole request, then one more message, and answers."""

    def __init__(self):
        self.received, self.send = [], None

    async def __call__(self, scope, receive, send):
        self.send = send
        while True:
            self.received.append(await receive())
            if self.received[-1]["type"] != "http.request" or not self.received[-1].get("more_body"):
                break
        self.received.append(await receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})


def drive(app, messages):
    incoming = list(messages)

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    sent = []
    scope = {"type": "http", "method": "POST", "path": "/sdapi/v1/txt2img", "headers": [(b"content-type", b"application/json")]}
    asyncio.run(app(scope, receive, send))
    return sent, send


@pytest.mark.parametrize(
    "chunks",
    [
        [b'{"prompt": "a", "alwayson_scripts": {"NAG": {"args": [true]}}}'],
        [b'{"prompt": "a", "alway', b'son_scripts": {"Other": {"args"', b": [1]}}}", b""],
        [b'{"prompt": "a", "alwayson_scripts": {"NAG": {"args": [true]}}}', b""],
        [b"not json at all"],
    ],
)
def test_the_route_receives_exactly_the_messages_the_client_sent(chunks):
    messages = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
    messages.append({"type": "http.disconnect"})
    alone, wrapped = Recorder(), Recorder()
    sent_alone, _ = drive(alone, messages)
    sent_wrapped, send = drive(api_check.NagEntryCheck(wrapped), messages)
    assert wrapped.received == alone.received == messages
    assert sent_wrapped == sent_alone and wrapped.send is send


def test_a_client_gone_mid_body_reaches_the_route_as_it_left():
    messages = [{"type": "http.request", "body": b'{"alwayson_scripts": {"NAG": ', "more_body": True}, {"type": "http.disconnect"}]
    received = []

    async def reads_until_gone(scope, receive, send):
        received.extend([await receive(), await receive()])

    drive(api_check.NagEntryCheck(reads_until_gone), messages)
    assert received == messages


def test_other_scopes_pass_through_untouched():
    seen = []

    async def route(scope, receive, send):
        seen.append((receive, send))

    async def receive():
        raise AssertionError("read by the check")

    async def send(message):
        pass

    asyncio.run(api_check.NagEntryCheck(route)({"type": "websocket", "path": "/sdapi/v1/txt2img"}, receive, send))
    assert seen == [(receive, send)]


def test_a_malformed_entry_raises_before_the_route_reads_anything():
    route = Recorder()
    body = json.dumps({"alwayson_scripts": {"NAG": [True]}}).encode()
    with pytest.raises(api_check.HTTPException) as raised:
        drive(api_check.NagEntryCheck(route), [{"type": "http.request", "body": body}])
    assert raised.value.status_code == 422 and "got a list" in raised.value.detail
    assert route.received == []


# --- on a host's app ----------------------------------------------------------------------------


class Other(scripts.Script):
    """Another alwayson script, with one control."""

    def title(self):
        return "Other"

    def show(self, is_img2img):
        return scripts.AlwaysVisible

    def ui(self, is_img2img):
        import gradio as gr

        return [gr.Number(value=0)]


@pytest.fixture
def host(monkeypatch):
    """The stand-in with a model and its txt2img scripts, NAG's and another."""
    reset_host()
    load(make_sd_model("sd1", pooled=True))
    monkeypatch.setattr(scripts, "scripts_txt2img", ui_runner(load_script_module().NagScript(), Other()))


@pytest.fixture
def apps(host):
    """Two apps with the stand-in's API, a GET and a POST route beside it and an img2img route that
    echoes its body; NAG's ``on_app_started`` has run on the second only."""
    built = []
    for install in (False, True):
        app = FastAPI()
        api.Api(app)

        async def echo(request: Request):
            return {"body": (await request.body()).decode()}

        app.add_api_route("/sdapi/v1/img2img", echo, methods=["POST"])
        app.add_api_route("/sdapi/v1/png-info", echo, methods=["POST"])
        app.add_api_route("/sdapi/v1/options", lambda: {"ok": True}, methods=["GET"])
        before = [(r, r.app) for r in app.router.routes]
        if install:
            script_callbacks.app_started_callback(None, app)
        built.append((app, before))
    return built


def test_the_title_checked_is_the_scripts():
    assert load_script_module().NagScript().title() == api_check.TITLE


def test_only_the_two_post_routes_are_wrapped_and_only_once(apps):
    app, before = apps[1]
    script_callbacks.app_started_callback(None, app)  # a second call changes nothing
    wrapped = {r.path for r, old in before if r.app is not old}
    assert wrapped == {"/sdapi/v1/txt2img", "/sdapi/v1/img2img"}
    for route, old in before:
        assert route.app is old or (isinstance(route.app, api_check.NagEntryCheck) and route.app.app is old)


def same_reply(a, b):
    assert (a.status_code, a.content, a.headers.multi_items()) == (b.status_code, b.content, b.headers.multi_items())


GUIDED = {"NAG well formed", "NAG with positional args", "NAG with args and another key"}


@pytest.mark.parametrize("case", list(LEFT_TO_THE_HOST))
def test_every_other_txt2img_request_gets_the_hosts_reply(apps, case, capsys):
    (plain, _), (checked, _) = apps
    body = {"prompt": "a cat", "steps": 2, **LEFT_TO_THE_HOST[case]}
    same_reply(*(TestClient(app).post("/sdapi/v1/txt2img", json=body) for app in (plain, checked)))
    assert capsys.readouterr().out.count("[NAG] active") == (2 if case in GUIDED else 0)


@pytest.mark.parametrize(
    "path,chunks,content_type",
    [
        ("/sdapi/v1/txt2img", [b'{"alwayson_scripts": {"NAG": [true]}}'], "text/plain"),
        ("/sdapi/v1/txt2img", [b'{"prompt": "a", "alwayson_scripts": {"NAG": [tr'], "application/json"),
        ("/sdapi/v1/txt2img", [b'{"prompt": "a", "st', b'eps": 2}'], None),  # streamed (chunked)
        ("/sdapi/v1/img2img", [b'{"alwayson_scripts": ', b'{"NAG": {"args": [true]}}}'], None),
        ("/sdapi/v1/png-info", [b'{"alwayson_scripts": {"NAG": [true]}}'], "application/json"),
    ],
)
def test_other_bodies_streams_and_routes_get_the_hosts_reply(apps, path, chunks, content_type):
    (plain, _), (checked, _) = apps
    headers = {"Content-Type": content_type} if content_type else {}
    body = (lambda: iter(chunks)) if len(chunks) > 1 else (lambda: chunks[0])
    same_reply(*(TestClient(app).post(path, content=body(), headers=headers) for app in (plain, checked)))
    same_reply(*(TestClient(app).get("/sdapi/v1/options") for app in (plain, checked)))
    same_reply(*(TestClient(app).get("/sdapi/v1/txt2img") for app in (plain, checked)))  # 405 as before


@pytest.mark.parametrize("path", ["/sdapi/v1/txt2img", "/sdapi/v1/img2img"])
@pytest.mark.parametrize("case", ["a bare list", "a bare dict of values", "args as a string"])
def test_a_malformed_nag_entry_gets_422_naming_the_form_and_no_job(apps, path, case, capsys):
    (plain, _), (checked, _) = apps
    body = {"prompt": "a cat", "steps": 2, "alwayson_scripts": MALFORMED[case][0]}
    reply = TestClient(checked).post(path, json=body)
    assert reply.status_code == 422
    assert reply.json()["error"] == "HTTPException" and api_check.FORM in reply.json()["detail"]
    assert "[NAG]" not in capsys.readouterr().out
    if path.endswith("txt2img"):  # what the host alone does with it: a job without NAG
        unguided = TestClient(plain).post(path, json=body)
        assert unguided.status_code == 200 and "NAG scale" not in unguided.json()["info"]
        assert "[NAG] active" not in capsys.readouterr().out
    follow = TestClient(checked).post("/sdapi/v1/txt2img", json={**body, "alwayson_scripts": {"NAG": NAG_ON}})
    assert follow.status_code == 200 and "NAG scale" in follow.json()["info"]


def test_installs_on_a_gradio_app_already_serving(host):
    """A1111's order (webui.py, 1.10.1): Gradio's app launches and answers, ``setup_middleware`` resets
    its middleware stack, ``create_api`` adds the routes, and ``on_app_started`` runs while the server
    answers; here a request comes first, so no middleware could be added any more."""
    import gradio as gr
    from gradio.routes import App

    with gr.Blocks() as demo:
        gr.Textbox()
    app = App.create_app(demo)
    client = TestClient(app)
    assert client.get("/config").status_code == 200
    app.middleware_stack = None
    api.Api(app)
    body = {"prompt": "a cat", "steps": 2, "alwayson_scripts": {"NAG": [True]}}
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 200
    with pytest.raises(RuntimeError, match="Cannot add middleware"):
        app.add_middleware(api_check.NagEntryCheck)
    script_callbacks.app_started_callback(demo, app)
    assert client.post("/sdapi/v1/txt2img", json=body).status_code == 422
