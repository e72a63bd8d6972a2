import pytest

from lib_nag.schedule import guided_steps, sampler_step


@pytest.mark.parametrize(
    "steps,start,end,expected",
    [
        (20, 0.0, 1.0, range(0, 20)),
        (20, 0.0, 0.25, range(0, 5)),
        (10, 0.3, 1.0, range(3, 10)),  # 0.3 * 10 is 3.0000000000000004 in floats
        (10, 0.0, 0.3, range(0, 3)),
        (7, 0.5, 1.0, range(4, 7)),
        (4, 0.0, 0.1, range(0, 1)),
        (20, 0.0, 0.01, range(0, 1)),
        (20, 0.5, 0.5 + 1e-12, range(0, 0)),
    ],
)
def test_window_in_fractions_of_steps(steps, start, end, expected):
    assert guided_steps(steps, start, end) == expected


def test_second_order_calls_of_one_step_get_one_decision():
    # Heun with 10 steps: A1111 reports total_steps 20 and counts each denoiser call.
    decisions = []
    for call in range(19):
        step, steps = sampler_step(call, 20, calls_per_step=2)
        assert steps == 10
        decisions.append(step in guided_steps(steps, 0.0, 0.45))
    assert decisions == [True] * 10 + [False] * 9


def test_first_order_calls_are_steps():
    assert [sampler_step(i, 8, 1) for i in (0, 7)] == [(0, 8), (7, 8)]
