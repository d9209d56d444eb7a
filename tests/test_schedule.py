import json
import subprocess
import sys

import pytest

from asyncdiff.schedule import Call, EpsSource, make_plan


def test_n4_w1_matches_paper_timeline():
    plan = make_plan(steps=6, components=4, stride=1, warmup=1)
    first = plan.steps[0]
    assert first.mode == "warmup"
    assert first.calls == tuple(Call(k, 0, 0) for k in range(4))
    for i in range(1, 6):
        st = plan.steps[i]
        assert st.mode == "compute"
        assert st.calls == (Call(0, i, i),) + tuple(Call(k, i, i - 1) for k in range(1, 4))
        assert st.eps == EpsSource(3, i, i)
    assert plan.parallel_rounds == 5


def test_n3_s2_w9_t50():
    plan = make_plan(steps=50, components=3, stride=2, warmup=9)
    assert all(plan.steps[i].mode == "warmup" for i in range(9))
    rounds = [s.step for s in plan.steps if s.mode == "compute"]
    assert rounds == list(range(9, 50, 2)) and len(rounds) == 21
    assert [s.step for s in plan.steps if s.mode == "comm"] == list(range(10, 50, 2))
    st = plan.steps[11]
    assert st.calls == (Call(0, 12, 11), Call(1, 12, 9), Call(2, 12, 9), Call(2, 11, 9))
    assert st.stride_copy and st.main_calls == st.calls[:3]
    assert st.eps == EpsSource(2, 11, 11)
    assert plan.steps[9].calls[1] == Call(1, 10, 8)  # the first round reads the last warm-up step
    comm = plan.steps[12]
    assert comm.calls == () and comm.eps == EpsSource(2, 12, 11)


def test_last_step_uses_last_timestep():
    plan = make_plan(steps=10, components=2, stride=2, warmup=1)
    last = plan.steps[9]
    assert last.mode == "compute"
    assert last.calls == (Call(0, 9, 9), Call(1, 9, 7), Call(1, 9, 7))
    assert last.eps == EpsSource(1, 9, 9)


def test_even_warmup_starts_rounds_at_first_async_step():
    plan = make_plan(steps=10, components=2, stride=2, warmup=2)
    assert [s.mode for s in plan.steps[:4]] == ["warmup", "warmup", "compute", "comm"]
    assert plan.steps[2].calls[1] == Call(1, 3, 1)
    # No step reuses a warm-up output as its noise prediction.
    assert all(s.eps.computed_at_step == s.step for s in plan.steps if s.mode != "comm")
    assert plan.steps[9].eps == EpsSource(1, 9, 8)


def test_every_step_eps_points_to_a_real_call():
    for args in [(25, 2, 1, 1), (25, 4, 1, 3), (25, 2, 2, 1), (25, 3, 2, 4), (7, 3, 2, 6)]:
        plan = make_plan(*args)
        for st in plan.steps:
            src = plan.steps[st.eps.computed_at_step]
            assert any(
                c.component == st.eps.component and c.timestep_index == st.eps.timestep_index
                for c in src.calls
            ), (args, st)


def test_time_shift():
    s1 = make_plan(steps=5, components=2, stride=1, warmup=2, time_shift=True)
    assert [c.timestep_index for c in s1.steps[3].calls] == [2, 2]
    assert s1.steps[1].calls[0].timestep_index == 1  # warm-up is never shifted
    s2 = make_plan(steps=6, components=2, stride=2, warmup=1, time_shift=True)
    assert [c.timestep_index for c in s2.steps[1].calls] == [1, 1, 0]
    assert s2.steps[2].eps == EpsSource(1, 1, 1)


def test_single_component_is_sequential():
    plan = make_plan(steps=4, components=1, stride=2, warmup=1)
    assert [s.mode for s in plan.steps] == ["warmup"] * 4
    assert plan.component_calls == 4


def test_full_warmup_is_sequential():
    plan = make_plan(steps=4, components=3, warmup=4)
    assert all(s.mode == "warmup" for s in plan.steps)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(steps=0, components=2), "steps"),
        (dict(steps=5, components=0), "components"),
        (dict(steps=5, components=2, stride=3), "stride"),
        (dict(steps=5, components=2, warmup=0), "warmup"),
        (dict(steps=5, components=2, warmup=6), "warmup"),
    ],
)
def test_invalid_arguments_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        make_plan(**kwargs)


def test_cli_prints_the_documented_json():
    out = subprocess.run(
        [sys.executable, "-m", "asyncdiff.schedule", "--steps", "4", "--components", "2",
         "--stride", "2", "--warmup", "1"],
        capture_output=True, text=True, check=True,
    ).stdout
    data = json.loads(out)
    assert data["steps"][0] == {
        "step": 0, "mode": "warmup",
        "calls": [{"component": 0, "timestep_index": 0, "reads_step": 0},
                  {"component": 1, "timestep_index": 0, "reads_step": 0}],
        "eps": {"component": 1, "timestep_index": 0, "computed_at_step": 0},
    }
    assert data["steps"][2] == {
        "step": 2, "mode": "comm", "calls": [],
        "eps": {"component": 1, "timestep_index": 2, "computed_at_step": 1},
    }


def test_cli_rejects_bad_warmup():
    proc = subprocess.run(
        [sys.executable, "-m", "asyncdiff.schedule", "--steps", "4", "--components", "2", "--warmup", "9"],
        capture_output=True, text=True,
    )
    assert proc.returncode == 2 and "warmup" in proc.stderr
