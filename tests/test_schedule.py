"""Pipeline schedules: every pass exactly once, dependencies respected, warm-up depths."""
import pytest

from sim.schedule import stage_schedule


@pytest.mark.parametrize("schedule, pp, m, v", [("gpipe", 4, 8, 1), ("1f1b", 4, 8, 1), ("1f1b", 8, 3, 1),
                                                ("interleaved", 4, 8, 2), ("interleaved", 2, 4, 3)])
def test_each_pass_once_and_backward_after_forward(schedule, pp, m, v):
    for stage in range(pp):
        order = stage_schedule(schedule, pp, stage, m, v)
        assert sorted(order) == sorted((ph, mb, c) for ph in "FB" for mb in range(m) for c in range(v))
        seen = set()
        for ph, mb, c in order:
            if ph == "B":
                assert ("F", mb, c) in seen
            seen.add((ph, mb, c))


def test_1f1b_in_flight_is_pp_minus_stage():
    pp, m = 4, 8
    for stage in range(pp):
        live = peak = 0
        for ph, _, _ in stage_schedule("1f1b", pp, stage, m):
            live += 1 if ph == "F" else -1
            peak = max(peak, live)
        assert peak == pp - stage


def test_gpipe_holds_all_microbatches():
    order = stage_schedule("gpipe", 4, 0, 8)
    assert [ph for ph, _, _ in order] == ["F"] * 8 + ["B"] * 8


def test_interleaved_warmup_matches_megatron():
    # Megatron-LM: warm-up = (pp - stage - 1) * 2 + (v - 1) * pp forward passes
    pp, v, m = 4, 2, 8
    for stage in range(pp):
        order = stage_schedule("interleaved", pp, stage, m, v)
        warm = next(i for i, e in enumerate(order) if e[0] == "B") - 1
        assert warm == (pp - stage - 1) * 2 + (v - 1) * pp
