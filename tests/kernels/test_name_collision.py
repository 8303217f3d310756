"""The repository's kernels/ (installed as sbpet.kernels) must not shadow Hugging Face's `kernels`
package when the repository root is on sys.path (`python -m pytest` in a checkout): transformers
>= 5.25 imports it (`from kernels import CUDAProperties`) whenever it is installed."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code: str, extra_path: str | None, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (REPO, extra_path) if p))
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)


def test_hugging_face_kernels_wins_over_the_repository_folder(tmp_path):
    site = tmp_path / "site"
    (site / "kernels").mkdir(parents=True)
    (site / "kernels" / "__init__.py").write_text("CUDAProperties = 'hub kernels'\n")
    code = ("import sys; assert sys.path.index(%r) < sys.path.index(%r)\n"
            "from kernels import CUDAProperties; import kernels\n"
            "import sbpet.kernels as ours\n"
            "print(CUDAProperties, kernels.__file__ != ours.__file__, hasattr(ours, 'HAS_TRITON'))") % (REPO, str(site))
    done = _run(code, str(site), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == ["hub", "kernels", "True", "True"]


def test_without_hugging_face_kernels_the_folder_imports_as_before(tmp_path):
    done = _run("import kernels; print(kernels.HAS_TRITON in (True, False))", None, tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == "True", done.stderr[-3000:]
