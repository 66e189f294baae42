"""Figures: Pareto front, what the scatter / bars / memory lines draw, valid and byte-stable files."""
import xml.etree.ElementTree as ET

import pytest
from hypothesis import given, settings, strategies as st

from sim.analysis import analyze
from sim.errors import ScenarioError
from sim.figures import (breakdown_bars, memory_over_time, pareto_front, plan_summary, save_figure,
                         sweep_scatter)
from sim.plot import plot_timeline, timeline_figure
from sim.scenario import load_scenario
from sim.units import GiB

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SCENARIO = """\
name: fig
model: gpt-1.7b
cluster: {topology: dgx-a100, nodes: 1}
training: {seq_len: 2048, global_batch_size: 16, micro_batch_size: 1, precision: bf16}
parallelism: {tp: 2, pp: 2, zero: 1}
"""


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    path = tmp_path_factory.mktemp("fig") / "fig.yaml"
    path.write_text(SCENARIO)
    return analyze(load_scenario(path))


def test_pareto_front_of_hand_made_points():
    # (memory, throughput). By hand, memory ascending: (5, 50) best so far; (10, 100) better; its duplicate
    # adds nothing; (15, 90) is beaten by (10, 100); (20, 150) better; (20, 140) beaten by (20, 150);
    # (25, 200) better; (30, 150) beaten by (25, 200).
    points = [(10, 100), (20, 150), (15, 90), (20, 140), (30, 150), (5, 50), (25, 200), (10, 100)]
    assert pareto_front(points) == [5, 0, 1, 6]
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 2.0)]) == [0]


def dominated(p, q) -> bool:
    """q dominates p: no more memory, no less throughput, and better in one."""
    return q[0] <= p[0] and q[1] >= p[1] and (q[0] < p[0] or q[1] > p[1])


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.integers(0, 20)), max_size=25))
def test_pareto_front_is_exactly_the_undominated_points(points):
    front = pareto_front(points)
    undominated = {p for p in points if not any(dominated(p, q) for q in points)}
    assert {points[i] for i in front} == undominated
    assert len(front) == len(undominated)                   # one index per distinct front point


def test_scatter_draws_the_front_the_capacity_and_the_misfits():
    cap = 80 * GiB
    recs = [  # memory GiB, tokens/s, fits
        {"label": "a", "peak_memory_bytes": 10 * GiB, "tokens_per_s": 100.0, "fits": True, "capacity_bytes": cap},
        {"label": "b", "peak_memory_bytes": 30 * GiB, "tokens_per_s": 300.0, "fits": True, "capacity_bytes": cap},
        {"label": "c", "peak_memory_bytes": 20 * GiB, "tokens_per_s": 90.0, "fits": True, "capacity_bytes": cap},
        {"label": "d", "peak_memory_bytes": 90 * GiB, "tokens_per_s": 400.0, "fits": False, "capacity_bytes": cap},
        {"label": "e", "peak_memory_bytes": 120 * GiB, "tokens_per_s": None, "fits": False, "capacity_bytes": cap},
        {"label": "f", "peak_memory_bytes": None, "tokens_per_s": None, "fits": None, "status": "error"},
    ]
    fig = sweep_scatter(recs)
    ax = fig.axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    front = lines["Pareto front (2)"]
    # front of the fitting plans: a (10 GiB, 100) then b (30 GiB, 300), held to the widest simulated plan (90 GiB)
    assert list(front.get_xdata()) == [10, 30, 90] and list(front.get_ydata()) == [100, 300, 300]
    assert front.get_drawstyle() == "steps-post"
    assert list(lines["does not fit, not simulated (1)"].get_xdata()) == [120]
    capacity = [line for line in ax.get_lines() if list(line.get_xdata()) == [80, 80]]
    assert len(capacity) == 1
    labels = [t.get_text() for t in ax.texts]
    assert any(t.startswith("b\n") and "300 tokens/s, 30.0 GiB" in t for t in labels)   # the top fitting plan
    assert "does not fit, simulated (1)" in [h.get_label() for h in ax.collections]


def test_breakdown_bars_stack_the_parts():
    fig = breakdown_bars(["x", "y"], [{"compute": 3.0, "exposed_comm": 1.0, "bubble": 0.5, "optimizer": 0.25,
                                       "other": 0.0}, None], notes=["", "does not fit"])
    ax = fig.axes[0]
    bars = [(p.get_x(), p.get_width(), p.get_y()) for p in ax.patches if p.get_width() > 0]
    # bar x: compute from 0, exposed comm from 3, bubble from 4, optimizer from 4.5
    assert sorted(b[:2] for b in bars) == [(0.0, 3.0), (3.0, 1.0), (4.0, 0.5), (4.5, 0.25)]
    assert [t.get_text() for t in ax.texts] == [" 4.75 s", " does not fit"]


def test_memory_over_time_one_line_per_stage(analysis):
    fig = memory_over_time(analysis.step, analysis.peak.capacity)
    ax = fig.axes[0]
    stages = [line for line in ax.get_lines() if line.get_label().startswith("stage")]
    assert [line.get_label() for line in stages] == ["stage 0", "stage 1"]
    for line, run in zip(stages, analysis.step.devices):
        assert max(line.get_ydata()) == pytest.approx(run.peak_bytes / GiB, rel=1e-12)
        assert line.get_xdata()[-1] == analysis.step.step_time_s
    cap = [line for line in ax.get_lines() if line.get_label().startswith("capacity")]
    assert list(cap[0].get_ydata()) == [80, 80]


def test_files_are_valid_and_byte_stable(analysis, tmp_path):
    recs = [{"label": "p", "peak_memory_bytes": 8 * GiB, "tokens_per_s": 5e4, "fits": True,
             "capacity_bytes": 80 * GiB}]
    figures = {
        "scatter": lambda: sweep_scatter(recs),
        "bars": lambda: breakdown_bars(["stage 0"], [analysis.time_breakdown_s]),
        "memory": lambda: memory_over_time(analysis.step, analysis.peak.capacity),
        "timeline": lambda: timeline_figure(analysis.step, title="t"),
    }
    png = save_figure(figures["scatter"](), tmp_path / "scatter.png")[0]      # (all PNGs: test_html_report)
    assert png.read_bytes()[:8] == PNG_MAGIC
    for name, make in figures.items():
        first = save_figure(make(), tmp_path / f"{name}.svg")[0]
        root = ET.parse(first).getroot()
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        again = save_figure(make(), tmp_path / f"{name}2.svg")[0]     # a new figure of the same input
        assert again.read_bytes() == first.read_bytes(), name
        assert b"<dc:date>" not in first.read_bytes()


def test_plot_timeline_keeps_its_signature(analysis, tmp_path):
    plot_timeline(analysis.step, tmp_path / "t.png", title="one step")
    assert (tmp_path / "t.png").read_bytes()[:8] == PNG_MAGIC


def test_save_figure_rejects_unknown_formats(analysis, tmp_path):
    with pytest.raises(ScenarioError, match="expected a file name ending in .png, .svg, .pdf"):
        save_figure(breakdown_bars(["a"], [None]), tmp_path / "x.jpg")
    with pytest.raises(ScenarioError, match="does not exist"):
        save_figure(breakdown_bars(["a"], [None]), tmp_path / "no" / "x.png")


def test_plan_summary():
    assert plan_summary({"tp": 8, "pp": 2, "cp": 1, "dp": 4, "zero": 1, "recompute": "selective",
                         "schedule": "interleaved", "virtual_stages": 2, "micro_batch_size": 1}) == \
        "TP8 PP2 CP1 DP4 Z1 rc-selective interleavedx2 mbs1"
    assert plan_summary({"tp": 1, "recompute": "none", "schedule": "1f1b"}) == "TP1"


def test_breakdown_of_a_csv_row_written_before_the_overlap_slowdown_part():
    # sweep CSVs from before the part existed have no time_overlap_slowdown_s column: 0, not "n/a"
    from sim.figures import record_breakdown
    old = {"time_compute_s": 1.0, "time_exposed_comm_s": 0.2, "time_bubble_s": 0.1,
           "time_optimizer_s": 0.05, "time_other_s": 0.0}
    parts = record_breakdown(old)
    assert parts is not None and parts["overlap_slowdown"] == 0.0 and parts["compute"] == 1.0
    assert record_breakdown({**old, "time_overlap_slowdown_s": None}) is None   # present but empty: not simulated
    assert record_breakdown({k: None for k in old}) is None
