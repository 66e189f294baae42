"""The validation command on its fast subset (the full set runs in `simulate validate`)."""
import csv
import math

import pytest

from sim.cli import main
from sim.validate import kendall_tau

from conftest import ROOT


def test_kendall_tau_by_hand():
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1
    assert kendall_tau([1, 2, 3], [30, 20, 10]) == -1
    assert kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)


def test_validation_set_covers_the_reference_rows():
    rows = list(csv.DictReader((ROOT / "validation" / "runs.csv").open()))
    simulated = [r for r in rows if r["scenario"]]
    assert len(simulated) >= 30
    assert len({r["source_id"].split("_")[0] for r in simulated}) >= 4
    assert {"v100-32gb", "a100-80gb", "h100-sxm"} <= {r["gpu"] for r in simulated}
    assert all(r["not_expressible"] for r in rows if not r["scenario"])   # skipped rows say why
    assert all((ROOT / "validation" / r["scenario"]).is_file() for r in simulated)


def test_validate_fast_subset(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code = main(["validate", "--fast", "--out", str(tmp_path), "--jobs", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert (tmp_path / "validation.md").is_file() and (tmp_path / "validation.png").is_file()
    rows = list(csv.DictReader((tmp_path / "validation.csv").open()))
    assert len(rows) >= 15 and not any(r["error"] for r in rows)
    errors = [abs(float(r["rel_error"])) for r in rows]
    assert all(math.isfinite(e) for e in errors)
