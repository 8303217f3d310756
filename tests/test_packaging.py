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


def test_old_flat_module_paths_still_import(tmp_path):
    """sbpet 0.1.0's flat paths (sbpet.regularizer, sbpet.dispatch, ...) give the module at its new
    path, the same object, with a DeprecationWarning naming the new path; the module keeps its own
    name and spec. Run in a fresh process: the first import is the one that warns."""
    code = (
        "import warnings\n"
        "import sbpet\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import sbpet.regularizer as old\n"
        "    from sbpet.dispatch import resolve_backend\n"
        "import sbpet.modules.regularizer as new, sbpet.backends.dispatch as dispatch\n"
        "assert old is new and resolve_backend is dispatch.resolve_backend\n"
        "assert new.__name__ == new.__spec__.name == 'sbpet.modules.regularizer', new.__spec__\n"
        "messages = [str(w.message) for w in caught if w.category is DeprecationWarning]\n"
        "assert messages == ['sbpet.regularizer moved to sbpet.modules.regularizer; import it from there',\n"
        "                    'sbpet.dispatch moved to sbpet.backends.dispatch; import it from there'], messages\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
