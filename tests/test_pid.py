"""PiD on Forge Neo: its text attention is MM-DiT joint attention (tests/forge/backend/nn/pixeldit.py), which
NAG does not run; NAG stands aside with a console line that names the model and says why."""

from types import SimpleNamespace

from backend.nn.pixeldit import PidNet
from modules import shared
from test_forge import sd_model_of
from test_wan import engine

from lib_nag.hosts.forge import ForgeHost
from lib_nag.params import NagParams
from lib_nag.webui.job import NagHost, NagJob


class PiD(SimpleNamespace):
    """Neo's engine class for PiD checkpoints."""


def test_pid_is_named_and_stood_aside_from(capsys):
    shared.sd_model = engine(PidNet(), PiD)
    host = ForgeHost.__new__(ForgeHost)
    NagHost.__init__(host)
    assert host.pass_for(shared.sd_model) is None
    p = SimpleNamespace(sample=lambda *args, **kwargs: None, is_hr_pass=False, extra_generation_params={})
    job = NagJob(host, p, NagParams(enabled=True))
    job.start_pass()
    assert job.pass_ is None
    p.sample()
    job.end()
    reason = "PiD's text reaches the image through MM-DiT joint attention (its patch blocks), not cross-attention; NAG does not run it yet"
    assert f"[NAG] skipped: {reason}" in capsys.readouterr().out
    assert "NAG scale" not in p.extra_generation_params


def test_other_models_are_not_taken_for_pid():
    host = ForgeHost.__new__(ForgeHost)
    stripped = PidNet()
    del stripped.pixel_blocks
    sd_model = sd_model_of(stripped)
    assert host.unsupported_reason(sd_model) == "NAG does not know the attention layers of SimpleNamespace (PidNet)"
