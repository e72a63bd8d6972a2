"""The README's examples and commands, as a user copies them (issue 17).

The API examples run against the A1111 stand-in's ``/sdapi/v1/txt2img`` (tests/a1111/modules/api) on a
FastAPI app, as 1.10.1 runs them: FastAPI reads the body into the request model, ``init_script_args``
builds the script arguments (passing over, without a word, an ``alwayson_scripts`` entry that is not a
dict with ``"args"``, as the host does) and the job runs. The curl example is sent as curl sends it;
the Python example runs as written with the real ``webuiapi`` client, its HTTP transport pointed at the
app. Each runs on the host's API alone and with NAG's request check installed at app start
(lib_nag/script/api_check.py): the examples must work on both.
"""

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import bench
import pytest
import requests
from fake_models import make_sd_model
from fastapi import FastAPI
from harness import load, reset_host, ui_runner
from modules import script_callbacks, scripts
from modules.api import api
from starlette.testclient import TestClient
from test_a1111 import load_script_module

from lib_nag import params as nag_params
from lib_nag.script import api_check, xyz

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
HOST = "127.0.0.1:7860"


def section(title: str) -> str:
    start = README.index(f"\n## {title}\n")
    end = README.find("\n## ", start + 1)
    return README[start : end if end != -1 else len(README)]


def code_blocks(text: str, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def ticked(text: str) -> list[str]:
    """The ``code`` spans of a passage outside its code blocks, their line breaks read as spaces."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    return [" ".join(span.split()) for span in re.findall(r"`([^`]+)`", prose)]


def paragraph(text: str, start: str) -> str:
    begin = text.index(start)
    end = text.find("\n\n", begin)
    return text[begin : end if end != -1 else len(text)]


API_EXAMPLES = code_blocks(section("API"), "bash") + code_blocks(section("API"), "python")


@pytest.fixture(params=["host API", "host API and NAG's check"])
def client(request, monkeypatch):
    reset_host()
    load(make_sd_model("sd1", pooled=True))
    monkeypatch.setattr(scripts, "scripts_txt2img", ui_runner(load_script_module().NagScript()))
    app = FastAPI()
    api.Api(app)
    if "check" in request.param:
        script_callbacks.app_started_callback(None, app)
    return TestClient(app)


def curl(command: str, client: TestClient):
    """What curl sends for the README's command: the ``-d`` data as a POST body, ``-H`` headers."""
    words = iter(shlex.split(command))
    assert next(words) == "curl"
    url, data, headers = None, None, {"Content-Type": "application/x-www-form-urlencoded"}  # curl -d's own type
    for word in words:
        if word == "-H":
            name, value = next(words).split(":", 1)
            headers[name.strip()] = value.strip()
        elif word == "-d":
            data = next(words)
        elif not word.startswith("-") and url is None:
            url = word
        else:
            assert word == "-s", f"the test does not know curl's {word}"
    assert urlsplit(url).netloc == HOST and data is not None
    return json.loads(data), client.post(urlsplit(url).path, content=data.encode(), headers=headers)


def run_python(code: str, client: TestClient, monkeypatch):
    """Run the README's Python as written; ``requests`` (which webuiapi sends through) reaches the app."""
    sent = []

    class ToApp(requests.adapters.BaseAdapter):
        def send(self, request, **kwargs):
            url = urlsplit(request.url)
            assert url.netloc == HOST
            reply = client.request(request.method, url.path, content=request.body, headers=dict(request.headers))
            sent.append((request, reply))
            response = requests.Response()
            response.status_code, response.url, response.request, response.encoding = reply.status_code, request.url, request, "utf-8"
            response.headers = requests.structures.CaseInsensitiveDict(reply.headers)
            response._content = reply.content
            return response

        def close(self):
            pass

    monkeypatch.setattr(requests.Session, "get_adapter", lambda session, url: ToApp())
    exec(compile(code, "README.md, API section", "exec"), {"__name__": "readme_example"})
    ((request, reply),) = [(r, a) for r, a in sent if r.method == "POST" and urlsplit(r.url).path == "/sdapi/v1/txt2img"]
    return json.loads(request.body), reply


def assert_nag_guided(body: dict, reply, out: str) -> None:
    assert reply.status_code == 200, reply.text
    written = json.loads(reply.json()["info"])["extra_generation_params"]
    nag = {k: v for k, v in written.items() if k.startswith("NAG ")}
    assert nag, f"NAG did not run for the README's request (alwayson_scripts {body['alwayson_scripts']!r}); console: {out!r}"
    entry = next(v for k, v in body["alwayson_scripts"].items() if k.lower() == "nag")
    assert nag == nag_params.to_infotext(nag_params.from_args(entry["args"]))
    steps = re.search(r"\[NAG\] active on SD1: first pass (\d+)/(\d+) steps guided", out)
    assert steps and int(steps[1]) > 0 and int(steps[2]) == body["steps"], out


def test_the_readme_has_a_curl_and_a_webuiapi_example():
    assert [b.split()[0] for b in API_EXAMPLES] == ["curl", "import"] and "webuiapi" in API_EXAMPLES[1]


def test_the_curl_example_guides(client, capsys):
    body, reply = curl(API_EXAMPLES[0], client)
    assert_nag_guided(body, reply, capsys.readouterr().out)


def test_the_webuiapi_example_guides_and_prints_nags_infotext(client, monkeypatch, capsys):
    body, reply = run_python(API_EXAMPLES[1], client, monkeypatch)
    out = capsys.readouterr().out
    assert_nag_guided(body, reply, out)
    assert "'NAG scale': " in out  # what the example prints


def test_the_api_argument_list_and_hires_modes_are_the_scripts():
    api_text = section("API")
    assert f"[{', '.join(nag_params.ARG_ORDER)}]" in ticked(api_text)
    assert ticked(paragraph(api_text, "`hires_mode` is one of"))[1:] == list(nag_params.HIRES_MODES)


def test_the_error_examples_are_the_messages_nag_gives():
    example = ticked(paragraph(section("API"), "On an enabled NAG, wrong types"))
    with pytest.raises(nag_params.NagParamError) as raised:
        nag_params.NagParams(enabled=True, tau=0.5)
    assert str(raised.value) in example
    example = ticked(paragraph(section("API"), "**A NAG entry in another form.**"))
    assert api_check.request_problem(None, b'{"alwayson_scripts": {"NAG": [true]}}') in example


def test_the_xyz_axes_are_the_registered_ones():
    assert [t for t in ticked(section("XYZ plot")) if t.startswith(xyz.PREFIX)] == [f"{xyz.PREFIX} {title}" for _name, title in xyz.AXES]


def test_the_infotext_keys_are_the_ones_nag_writes():
    listed = [t for t in ticked(paragraph(section("Use"), "**Infotext.**")) if t.startswith("NAG ")]
    assert listed == [nag_params.label(name) for name in nag_params.ARG_ORDER[1:]]


def test_the_preset_table_is_the_dropdown():
    table = paragraph(section("Use"), "| preset |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table.splitlines()[2:]]
    assert [(r[0], *map(float, r[1:5])) for r in rows] == [(p.name, p.scale, p.tau, p.alpha, p.end) for p in nag_params.PRESETS]


def test_the_test_commands_are_what_ci_runs():
    commands = code_blocks(section("Tests"), "bash")[0].splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert commands == [line for line in ci if line.startswith("python ")]


def test_the_benchmark_commands_parse():
    commands = [t for t in ticked(section("Benchmark")) if t.startswith("python tests/bench.py")]
    assert len(commands) >= 4
    for command in commands:
        bench.parse_args([w for w in shlex.split(command)[2:] if w != "--help"])
