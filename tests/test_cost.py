"""asyncdiff.cost: the projected speedup equals the textbook ideal on balanced costs."""

from __future__ import annotations

import json

import pytest

from asyncdiff.cost import balanced, main, project, projected_speedup
from asyncdiff.placement import Placement
from asyncdiff.schedule import make_plan


def ideal(steps: int, n: int, s: int, warmup: int = 1, batched: bool = False) -> float:
    return projected_speedup(make_plan(steps, n, s, warmup), Placement(n, s, batched),
                             balanced(n, batched))


@pytest.mark.parametrize("steps, n, s, batched, expected", [
    (25, 2, 1, False, 25 / 13),  # 1 warm-up step + 24 rounds of 1/2
    (25, 2, 2, False, 25 / 7),  # 1 + 12 rounds of 1/2 (two steps per round, N+1 devices)
    (20, 2, 1, False, 20 / 10.5),  # 1.90x, the module's example
    (20, 2, 2, True, 20 / (1 + 10 * 2 / 3)),  # 2.61x: 10 rounds, the last device runs 2 x 1/3
    (20, 1, 1, False, 1.0),
])
def test_textbook_values(steps, n, s, batched, expected):
    assert ideal(steps, n, s, batched=batched) == pytest.approx(expected, rel=1e-12)


def test_batched_n2s2_t20_is_2_61():
    assert round(ideal(20, 2, 2, batched=True), 2) == 2.61


def test_balanced_costs():
    assert balanced(4) == [0.25] * 4
    assert balanced(2, batched_stride=True) == pytest.approx([2 / 3, 1 / 3])
    assert sum(balanced(3, batched_stride=True)) == pytest.approx(1.0)


def test_projection_parts_and_transfer_cost():
    plan, place = make_plan(10, 2, 1, 2), Placement(2, 1)
    p = project(plan, place, [0.6, 0.4], transfer_cost=0.1)
    assert (p.warmup_steps, p.rounds) == (2, 8)
    assert p.round_cost == pytest.approx(0.7)  # busiest device + one transfer
    assert p.asynchronous == pytest.approx(2 * (1.0 + 0.1) + 8 * 0.7)
    assert p.speedup == pytest.approx(10 / p.asynchronous)
    # A measured full denoiser call (e.g. cheaper than its components in sequence).
    assert project(plan, place, [0.6, 0.4], denoiser_cost=0.9).sequential == pytest.approx(9.0)


def test_host_cost_is_paid_per_warm_up_call_and_per_round_on_the_chain():
    """Host 0.1 per call: a warm-up step pays it per call; a round costs the larger of the
    busiest device and the mean load plus the host (the 0 -> 1 -> scheduler chain spans N
    rounds); the sequential baseline pays it per step."""
    plan, place = make_plan(10, 2, 1, 2), Placement(2, 1)
    p = project(plan, place, [0.6, 0.4], host_cost=0.1)
    assert p.round_cost == pytest.approx(0.6)  # 0.6 > (0.6 + 0.4) / 2 + 0.1
    assert p.asynchronous == pytest.approx(2 * (1.0 + 2 * 0.1) + 8 * 0.6)
    assert p.sequential == pytest.approx(10 * 1.1)
    balanced_cut = project(plan, place, [0.5, 0.5], host_cost=0.1)
    assert balanced_cut.round_cost == pytest.approx(0.6)  # the chain: 0.5 + 0.1
    assert balanced_cut.asynchronous == pytest.approx(p.asynchronous)  # no cut beats the chain
    assert project(plan, place, [0.5, 0.5], host_cost=0.1).speedup < \
        project(plan, place, [0.5, 0.5]).speedup
    with pytest.raises(ValueError, match="costs must be >= 0"):
        project(plan, place, [0.5, 0.5], host_cost=-1.0)


def test_bad_costs_are_rejected():
    plan = make_plan(5, 2, 1, 1)
    with pytest.raises(ValueError, match="plan has 2 components, placement 3, costs 2"):
        project(plan, Placement(3), [0.5, 0.5])
    with pytest.raises(ValueError, match="costs must be >= 0"):
        project(plan, Placement(2), [0.5, -0.5])


def test_cli(capsys):
    main(["--steps", "25", "--components", "2", "--stride", "2"])
    out = json.loads(capsys.readouterr().out)
    assert out["placement"]["world_size"] == 3
    assert out["projection"]["speedup"] == pytest.approx(25 / 7)
