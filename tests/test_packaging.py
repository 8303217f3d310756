"""kernels/ is installed as sbpet.kernels, never as a top-level `kernels` module."""

import os
import subprocess
import sys


def test_import_kernels_does_not_find_this_project(tmp_path):
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    code = (
        "import importlib.util, os, sys\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "origin = os.path.realpath(spec.origin) if spec and spec.origin else ''\n"
        f"assert not origin.startswith(os.path.realpath({repo!r}) + os.sep), origin\n"
        "import sbpet.kernels\n"
        "assert os.path.basename(os.path.dirname(sbpet.kernels.__file__)) == 'kernels'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
