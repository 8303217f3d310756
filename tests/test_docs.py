"""The docs site and the first screen: the site builds with ``mkdocs build --strict`` (broken links
and anchors, and docstrings the API reference cannot render, fail it), the API reference covers
``sbpet.__all__``, the study's numbers quoted in the README and the docs agree with the committed
``table.md`` files, no issue numbers in user-facing text, one version, a license, and a README that
keeps CI's command. (The code blocks: tests/test_readme.py.)"""

from __future__ import annotations

import glob
import importlib
import inspect
import os
import re
import subprocess
import sys

import pytest

import sbpet
from sbpet.core.version import __version__

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
STUDY_TABLES = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "results", "study*", "**", "table.md"), recursive=True))
# The pages that quote the study's numbers (the table pages include the files themselves).
QUOTING = [README, os.path.join(ROOT, "docs", "index.md"), os.path.join(ROOT, "docs", "study.md")]


def read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def test_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    pytest.importorskip("mkdocstrings_handlers.python")
    pytest.importorskip("material")
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", os.path.join(ROOT, "mkdocs.yml"),
                           "-d", str(site)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    api = (site / "api" / "index.html").read_text(encoding="utf-8")
    for name in sbpet.__all__:
        assert name in api, name
    assert ":class:" not in api and ":mod:" not in api  # the roles are rendered (tools/docs_hooks.py)
    # Committed files are included, not copied: the study table's command and the figures are there.
    bbc = (site / "study-bbc" / "index.html").read_text(encoding="utf-8")
    assert "sbpet study --dataset bbc" in bbc and (site / "img" / "study2-bbc.png").stat().st_size > 10_000
    quickstart = (site / "quickstart" / "index.html").read_text(encoding="utf-8")
    assert "fit_mapping" in quickstart and "BridgeSFTTrainer" in quickstart


def test_api_reference_covers_the_public_api():
    """Every name of sbpet.__all__ has a ``::: module.name`` entry in docs/api.md that is that very
    object, and nothing else is listed but BridgeSFTTrainer (public, kept out of __all__ so that
    ``from sbpet import *`` works without TRL)."""
    entries = re.findall(r"^::: (\S+)$", read(os.path.join(ROOT, "docs", "api.md")), flags=re.M)
    listed = {}
    for entry in entries:
        module, name = entry.rsplit(".", 1)
        assert getattr(importlib.import_module(module), name) is getattr(sbpet, name), entry
        listed[name] = entry
    assert sorted(listed) == sorted([*sbpet.__all__, "BridgeSFTTrainer"])
    assert len(entries) == len(listed)


def _table_text() -> str:
    assert len(STUDY_TABLES) == 4, STUDY_TABLES
    return "\n".join(read(path) for path in STUDY_TABLES)


INTERVAL = re.compile(r"[+-]\d\.\d{3} \[[+-]\d\.\d{3}, [+-]\d\.\d{3}\]")
MEAN_STD = re.compile(r"\d\.\d{3} ± \d\.\d{3}")
NUMBER = re.compile(r"(?<![\d.])[+-]?\d\.\d{3,4}(?![\d])")


def _runs(task: str) -> list[dict]:
    import json

    with open(os.path.join(ROOT, "benchmarks", "results", "study2", task, "runs.json"), encoding="utf-8") as f:
        return json.load(f)["runs"]


def _paper_differences(task: str, fit_steps: int) -> dict[int, float]:
    """Seed -> test accuracy of the paper-protocol [MASK] cell at ``fit_steps`` minus its vanilla
    run, at the alpha with the best mean validation accuracy (as the tables choose it)."""
    import statistics

    runs = [r for r in _runs(task) if r["protocol"] == "paper"]
    vanilla = {r["seed"]: r["test_accuracy"] for r in runs if r["regularizer"] == "none"}
    cell = [r for r in runs if r["regularizer"] == "pdf-brownian" and r["fit_steps"] == fit_steps
            and r["positions"] == "mask"]
    alpha = max(sorted({r["alpha"] for r in cell}),
                key=lambda a: statistics.mean(r["val_accuracy"] for r in cell if r["alpha"] == a))
    return {r["seed"]: r["test_accuracy"] - vanilla[r["seed"]] for r in cell if r["alpha"] == alpha}


def derived_quotes() -> dict[str, str]:
    """The study page's numbers that no table holds, recomputed from the committed runs.json files:
    quote -> what it is."""
    import statistics

    from sbpet.cli.study.stats import paired_summary

    quotes = {}
    (seed6,) = [r for r in _runs("bbc") if r["seed"] == 6 and r["protocol"] == "paper" and r["regularizer"] == "none"]
    quotes[f"scored {seed6['test_accuracy']:.3f} on test"] = "BBC seed 6's vanilla paper-protocol test accuracy"
    pooled = {}
    for steps in (150, 2000, 10000):
        pooled[steps] = paired_summary([*_paper_differences("rotten-tomatoes", steps).values(),
                                        *_paper_differences("bbc", steps).values()])
        quotes[f"{pooled[steps]['mean']:+.3f} [{pooled[steps]['low']:+.3f}, {pooled[steps]['high']:+.3f}]"] = (
            f"both tasks pooled, g {steps}")
    last = pooled[10000]
    quotes[f"({last['wins']} wins, {last['losses']} losses, sign p {last['p']:.2f}; detectable "
           f"{last['detectable']:.3f})"] = "both tasks pooled, g 10000: the sign test"
    bbc = {steps: _paper_differences("bbc", steps) for steps in (150, 2000, 10000)}
    means = [f"{statistics.mean(v for seed, v in bbc[steps].items() if seed != 6):+.3f}" for steps in bbc]
    medians = [f"{statistics.median(bbc[steps].values()):+.3f}" for steps in bbc]
    quotes[f"read {means[0]}, {means[1]} and {means[2]} (median difference over the 10 seeds "
           f"{', '.join(medians)})"] = "BBC without seed 6, and the medians"
    return quotes


def test_the_study_page_numbers_from_runs_are_recomputed():
    """What docs/study.md computes from runs.json (the pooled cells, BBC without seed 6 and its
    medians, seed 6's score) is recomputed here from the committed files and found on the page."""
    text = " ".join(read(os.path.join(ROOT, "docs", "study.md")).split())
    quotes = derived_quotes()
    for quote, what in quotes.items():
        assert quote in text, (what, quote)
    assert "+0.008 [-0.008, +0.023]" in quotes and "(14 wins, 6 losses, sign p 0.12; detectable 0.026)" in quotes


@pytest.mark.parametrize("path", QUOTING, ids=lambda p: os.path.relpath(p, ROOT))
def test_quoted_study_numbers_agree_with_the_tables(path):
    """Each interval ("+0.016 [-0.013, +0.045]") and mean ± std quoted is in a committed table as
    written (or recomputed from its runs.json, above), and so is every other number with 3-4
    decimals (accuracies, R), as a number of some table."""
    tables = _table_text()
    numbers = set(NUMBER.findall(tables)) | {n.lstrip("+-") for n in NUMBER.findall(tables)}
    derived = " ".join(derived_quotes())
    text = read(path)
    for quote in INTERVAL.findall(text) + MEAN_STD.findall(text):
        assert quote in tables or quote in derived, f"{os.path.relpath(path, ROOT)} quotes {quote!r}, which no study table holds"
    for number in NUMBER.findall(text):
        assert number in numbers or number.lstrip("+-") in numbers or number in derived, (
            f"{os.path.relpath(path, ROOT)} quotes {number}, which no study table holds")
    if path != os.path.join(ROOT, "docs", "study.md"):
        assert INTERVAL.search(text), "the status answer quotes the study's intervals"


ISSUE = re.compile(r"\b[Ii]ssues? #?\d+|(?<![\w/#])#\d{1,3}\b")
EXTERNAL = re.compile(r"\b[\w-]+ issue #\d+|[\w-]+#\d+")  # another project's issue: a citation


def _issue_numbers(text: str) -> list[str]:
    return ISSUE.findall(EXTERNAL.sub("", text))


def test_no_issue_numbers_in_user_facing_text():
    problems = []
    for path in [README, os.path.join(ROOT, "CHANGELOG.md"), *PAGES]:
        problems += [f"{os.path.relpath(path, ROOT)}: {m}" for m in _issue_numbers(read(path))]
    for path in glob.glob(os.path.join(ROOT, "sbpet", "cli", "**", "*.py"), recursive=True):
        problems += [f"{os.path.relpath(path, ROOT)}: {m}" for m in _issue_numbers(read(path))]
    for name in sbpet.__all__:  # the docstrings the API reference shows
        obj = getattr(sbpet, name)
        docs = [inspect.getdoc(obj) or ""] + [inspect.getdoc(member) or "" for attr, member in
                                              inspect.getmembers(obj) if not attr.startswith("_")
                                              and inspect.isfunction(member)] if inspect.isclass(obj) else [
            inspect.getdoc(obj) or "" if callable(obj) else ""]
        problems += [f"sbpet.{name}: {m}" for doc in docs for m in _issue_numbers(doc)]
    assert not problems, problems


def test_issue_pattern_can_fail():
    assert _issue_numbers("the README speaks of issue 21's study and (#22)") == ["issue 21", "#22"]
    assert _issue_numbers("transformers issue #47688 and [transformers#47688](...)") == []


def test_one_version_everywhere():
    assert __version__ == "0.2.0"
    assert 're.search(r\'__version__ = "([^"]+)"\', open("sbpet/core/version.py")' in read(os.path.join(ROOT, "setup.py"))
    definitions = [path for path in glob.glob(os.path.join(ROOT, "sbpet", "**", "*.py"), recursive=True)
                   if re.search(r"^__version__\s*=", read(path), flags=re.M)]
    assert definitions == [os.path.join(ROOT, "sbpet", "core", "version.py")]
    assert sbpet.__version__ == __version__
    assert re.search(rf"^version: {re.escape(__version__)}$", read(os.path.join(ROOT, "CITATION.cff")), flags=re.M)
    assert re.search(rf"^## {re.escape(__version__)}\b", read(os.path.join(ROOT, "CHANGELOG.md")), flags=re.M)


def test_license_and_citation():
    text = read(os.path.join(ROOT, "LICENSE"))
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    setup = read(os.path.join(ROOT, "setup.py"))
    assert 'license="Apache-2.0"' in setup and "License :: OSI Approved :: Apache Software License" in setup
    yaml = pytest.importorskip("yaml")
    citation = yaml.safe_load(read(os.path.join(ROOT, "CITATION.cff")))
    paper = citation["preferred-citation"]
    assert paper["title"] == "Stochastic Bridges as Effective Regularizers for Parameter-Efficient Tuning"
    assert paper["year"] == 2023 and paper["authors"][0]["family-names"] == "Chen"
    assert "Findings" in paper["collection-title"] and citation["license"] == "Apache-2.0"


def test_readme_is_a_first_screen():
    text = read(README)
    assert len(text.splitlines()) <= 200
    head = text[: text.index("## Install")]
    assert "Does it help?" in head and "Is it fast?" in head and "Which models?" in head
    assert "No GPU run has been made" in head or "no GPU run has been made" in head
    assert "sbpet.cli.demo" not in text  # the recipes are for your own model
    # CI's command (.ci/run takes the first such line): both pip steps from the constraints, and
    # the docs extra, so that the site's build runs in CI.
    command = next(line for line in text.splitlines() if re.search(r'pip install .*-e "\.\[dev', line))
    assert command.count("-c constraints.txt") >= 2 and '".[dev,demo,docs]"' in command
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if not re.match(r"[a-z]+://", target):
            assert os.path.exists(os.path.join(ROOT, target)), f"README links {target}, which is not in the repository"


def test_no_file_outside_the_repository_is_cited():
    """The GPU check's how-to is docs/gpu-check.md; a GPU.md outside the repository was cited."""
    for path in [README, *PAGES, *glob.glob(os.path.join(ROOT, "benchmarks", "*.md")),
                 *glob.glob(os.path.join(ROOT, "benchmarks", "*.py"))]:
        assert "GPU.md" not in read(path), path


def test_docs_extra_is_pinned():
    """Every package the docs extra installs is pinned in constraints.txt (the README's command
    installs it with -c constraints.txt)."""
    pins = {re.sub(r"[-_.]+", "-", line.split("==")[0]).lower() for line in read(os.path.join(ROOT, "constraints.txt")).splitlines()
            if "==" in line and not line.startswith("#")}
    setup = read(os.path.join(ROOT, "setup.py"))
    docs = re.search(r'"docs": \[([^\]]*)\]', setup).group(1)
    for requirement in re.findall(r'"([^"]+)"', docs):
        name = re.split(r"[\[<>=]", requirement)[0]
        assert re.sub(r"[-_.]+", "-", name).lower() in pins, requirement


def test_sphinx_roles_render_as_code():
    """tools/docs_hooks.py: the docstrings' Sphinx roles become code in the API reference."""
    sys.path.insert(0, ROOT)
    from tools.docs_hooks import render_roles

    html = "see :class:<code>~sbpet.BridgeRegularizer</code> and :mod:<code>sbpet.core.checks</code>"
    assert render_roles(html) == "see <code>BridgeRegularizer</code> and <code>sbpet.core.checks</code>"


def test_the_stale_lines_are_gone():
    """Lines that contradicted the code or each other: the kernels do take fixed-capacity rows,
    one fitting budget (100k steps x 128), the 1.36x that missed its 1.4x target is said as such,
    and no snippet passes use_kernels=False (transformers < 5 does not take it)."""
    stale = ["the Triton kernels do not take fixed-capacity rows", "500k steps", "36 hours", "gains 1.4-1.9x",
             "Both snippets run as written", "Still to do ("]
    for path in [README, *PAGES]:
        text = read(path)
        for line in stale:
            assert line not in text, (os.path.relpath(path, ROOT), line)
    from test_readme import FILES, code_blocks

    assert not [b.where() for path in FILES for b in code_blocks(path) if "use_kernels=False" in b.code]
