"""sbpet.hf: hooks vs output_hidden_states (loss and gradients), virtual-token alignment,
positions/labels for the three setups, and which parameters the regulariser's gradient reaches."""

import pytest
import torch

from hf_helpers import LABEL_WORDS, MASK_ID, VOCAB, classification_batch, tiny_bert_config, tiny_gpt2_config, tiny_regularizer
from helpers import assert_close

peft = pytest.importorskip("peft")
from peft import IA3Config, LoraConfig, PrefixTuningConfig, PromptTuningConfig, TaskType, get_peft_model  # noqa: E402
from transformers import BertForSequenceClassification, GPT2LMHeadModel  # noqa: E402

from sbpet.hf import (  # noqa: E402
    BridgeCapture,
    align_to_states,
    causal_lm_bridge_labels,
    classification_bridge_labels,
    find_backbone_and_layers,
    masked_lm_bridge_labels,
    num_virtual_tokens,
)
from sbpet.hf.peft_utils import apply_bitfit, check_only_pet_trainable  # noqa: E402

BERT_METHODS = {
    "lora": lambda: LoraConfig(task_type=TaskType.SEQ_CLS, r=4, target_modules=["query", "value"]),
    "prompt": lambda: PromptTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=5),
    "prefix": lambda: PrefixTuningConfig(task_type=TaskType.SEQ_CLS, num_virtual_tokens=4),
    "ia3": lambda: IA3Config(task_type=TaskType.SEQ_CLS, target_modules=["key", "value", "output.dense"],
                             feedforward_modules=["output.dense"]),
    "bitfit": None,
}


def _bert(method, seed=0):
    torch.manual_seed(seed)
    base = BertForSequenceClassification(tiny_bert_config()).eval()
    if method == "bitfit":
        apply_bitfit(base)
        return base, base
    model = get_peft_model(base, BERT_METHODS[method]())
    if method == "lora":  # lora_B starts at zero; make the adapters do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.05)
    return model, base


def _hooks_and_hidden_states(model, reg, forward, labels, mask):
    params = [p for p in model.parameters() if p.requires_grad]
    capture = BridgeCapture(model, reg)
    with capture.armed(labels, mask):
        forward()
    hooked = capture.loss()
    hooked_grads = torch.autograd.grad(hooked, params, allow_unused=True)
    capture.remove()
    out = forward(output_hidden_states=True)
    aligned_labels, aligned_mask = align_to_states(labels, mask, num_virtual_tokens(model))
    full = reg(out.hidden_states, aligned_labels, aligned_mask)
    full_grads = torch.autograd.grad(full, params, allow_unused=True)
    return hooked, hooked_grads, full, full_grads


@pytest.mark.parametrize("method", list(BERT_METHODS))
def test_hooks_equal_output_hidden_states_bert(method):
    model, base = _bert(method)
    reg = tiny_regularizer(base, bridge="ou")
    ids, mask, y = classification_batch()
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    forward = lambda **kw: model(input_ids=ids, attention_mask=mask, labels=y, **kw)  # noqa: E731
    hooked, hooked_grads, full, full_grads = _hooks_and_hidden_states(model, reg, forward, labels, mask)
    assert_close(hooked, full, name=f"{method} loss")
    assert hooked.item() > 0
    for i, (a, b) in enumerate(zip(hooked_grads, full_grads)):
        assert (a is None) == (b is None), f"param {i}"
        if a is not None:
            assert_close(a, b, name=f"{method} grad {i}", atol=1e-6)


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_hooks_equal_output_hidden_states_gpt2_causal(method):
    torch.manual_seed(1)
    base = GPT2LMHeadModel(tiny_gpt2_config()).eval()
    config = (LoraConfig(task_type=TaskType.CAUSAL_LM, r=4, target_modules=["c_attn"]) if method == "lora"
              else PromptTuningConfig(task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3))
    model = get_peft_model(base, config)
    reg = tiny_regularizer(base, shift_labels=True)
    ids, mask, _ = classification_batch(mask_token=False, seed=2)
    labels = causal_lm_bridge_labels(ids, mask)
    forward = lambda **kw: model(input_ids=ids, attention_mask=mask, labels=labels, **kw)  # noqa: E731
    hooked, hooked_grads, full, full_grads = _hooks_and_hidden_states(model, reg, forward, labels, mask)
    assert_close(hooked, full, name="gpt2 loss")
    for i, (a, b) in enumerate(zip(hooked_grads, full_grads)):
        if a is not None:
            assert_close(a, b, name=f"gpt2 grad {i}", atol=1e-6)


def test_prompt_tuning_alignment_shifts_positions_and_context():
    """With P virtual tokens the [MASK] state sits at s + P and the context covers the virtual
    tokens: the hooked loss equals the loss on explicitly aligned states, and differs from
    pretending nothing shifted."""
    model, base = _bert("prompt")
    assert num_virtual_tokens(model) == 5
    reg = tiny_regularizer(base)
    ids, mask, y = classification_batch()
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    capture = BridgeCapture(model, reg)
    with torch.no_grad(), capture.armed(labels, mask):
        model(input_ids=ids, attention_mask=mask)
    hooked = capture.loss()
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    assert states[0].shape[1] == ids.shape[1] + 5
    shifted = [h[:, 5:] for h in states]  # drop the virtual tokens: wrong positions' context
    wrong = reg(shifted, labels, mask)
    manual_labels = torch.full((ids.shape[0], ids.shape[1] + 5), -100)
    manual_labels[:, 5:] = labels
    manual_mask = torch.cat([torch.ones(ids.shape[0], 5, dtype=torch.long), mask], 1)
    right = reg(states, manual_labels, manual_mask)
    assert_close(hooked, right, name="aligned")
    assert abs(hooked.item() - wrong.item()) > 1e-4
    assert num_virtual_tokens(_bert("prefix")[0]) == 0


def test_capture_rejects_misaligned_labels():
    model, base = _bert("prompt")
    capture = BridgeCapture(model, tiny_regularizer(base))
    ids, mask, y = classification_batch()
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    aligned, aligned_mask = align_to_states(labels, mask, 5)  # already aligned: shifted twice
    with pytest.raises(ValueError, match="virtual tokens"):
        with capture.armed(aligned, aligned_mask):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(RuntimeError, match="armed"):
        capture.loss()


@pytest.mark.parametrize("method", list(BERT_METHODS))
def test_regulariser_gradient_reaches_only_pet_parameters(method):
    model, base = _bert(method)
    reg = tiny_regularizer(base)
    reg.requires_grad_(False)
    trainable = check_only_pet_trainable(model, max_fraction=0.5)
    ids, mask, y = classification_batch()
    labels = classification_bridge_labels(mask, y, LABEL_WORDS, "first")
    capture = BridgeCapture(model, reg)
    with capture.armed(labels, mask):
        model(input_ids=ids, attention_mask=mask)
    capture.loss().backward()
    reached = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            assert p.grad is None, f"frozen {name} got a gradient"
        elif p.grad is not None and p.grad.abs().sum() > 0:
            reached.append(name)
    assert reached, f"{method}: the regulariser's gradient reached no PET parameter of {trainable}"
    assert all(p.grad is None for p in reg.parameters())


def test_capture_under_gradient_checkpointing_and_bfloat16_autocast():
    model, base = _bert("lora")
    # transformers 5.2x renamed it (the old name warns and goes in v6)
    base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    reg = tiny_regularizer(base)
    ids, mask, y = classification_batch()
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    capture = BridgeCapture(model, reg)
    with torch.autocast("cpu", dtype=torch.bfloat16), capture.armed(labels, mask):
        out = model(input_ids=ids, attention_mask=mask, labels=y)
    loss = capture.loss()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    (out.loss + loss).backward()
    assert any(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_position_helpers():
    ids = torch.tensor([[1, 5, MASK_ID, 2, 0], [1, MASK_ID, 7, 8, 2]])
    mask = (ids != 0).long()
    y = torch.tensor([2, 0])
    mlm = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    assert mlm[0, 2] == 30 and mlm[1, 1] == 10 and (mlm != -100).sum() == 2
    first = classification_bridge_labels(mask, y, LABEL_WORDS, "first")
    assert first[:, 0].tolist() == [30, 10] and (first != -100).sum() == 2
    last = classification_bridge_labels(mask, y, LABEL_WORDS, "last")
    assert last[0, 3] == 30 and last[1, 4] == 10
    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert classification_bridge_labels(left_padded, y, LABEL_WORDS, "first")[0, 1] == 30
    causal = causal_lm_bridge_labels(ids, mask)
    assert causal[0, 4] == -100 and causal[1, 4] == 2
    with pytest.raises(ValueError, match="exactly one mask"):
        masked_lm_bridge_labels(torch.tensor([[1, 2, 3]]), torch.tensor([0]), MASK_ID, LABEL_WORDS)
    with pytest.raises(ValueError, match="class_labels"):
        classification_bridge_labels(mask, torch.tensor([0, 3]), LABEL_WORDS)
    with pytest.raises(ValueError, match="position"):
        classification_bridge_labels(mask, y, LABEL_WORDS, "middle")


def test_find_layers_and_errors():
    model, base = _bert("lora")
    backbone, layers = find_backbone_and_layers(model)
    assert type(backbone).__name__ == "BertModel" and len(layers) == 3
    gpt = GPT2LMHeadModel(tiny_gpt2_config())
    assert len(find_backbone_and_layers(gpt)[1]) == 3
    with pytest.raises(TypeError, match="PreTrainedModel"):
        find_backbone_and_layers(torch.nn.Linear(2, 2))
    reg = tiny_regularizer(base)
    wrong = tiny_regularizer(BertForSequenceClassification(tiny_bert_config(num_hidden_layers=2)))
    with pytest.raises(ValueError, match="num_layers"):
        BridgeCapture(model, wrong)
    capture = BridgeCapture(model, reg)
    ids, mask, y = classification_batch()
    bad = torch.full_like(ids, -100)
    bad[0, 0] = VOCAB + 3
    with pytest.raises(ValueError, match="labels must be in"):
        with capture.armed(bad, mask):
            pass
    with pytest.raises(ValueError, match="no real token"):
        with capture.armed(torch.full_like(ids, -100), torch.zeros_like(mask)):
            pass


def test_bitfit_helper():
    model = BertForSequenceClassification(tiny_bert_config())
    names = apply_bitfit(model, extra_trainable=["pooler.dense.weight"])
    assert all(n.endswith("bias") or "classifier" in n or "pooler" in n for n in names)
    assert "classifier.weight" in names and "bert.pooler.dense.weight" in names
    assert not model.bert.embeddings.word_embeddings.weight.requires_grad
    with pytest.raises(ValueError, match="no bias"):
        apply_bitfit(torch.nn.Linear(3, 3, bias=False))
    with pytest.raises(ValueError, match="not frozen"):
        check_only_pet_trainable(BertForSequenceClassification(tiny_bert_config()))


def test_bitfit_keeps_the_new_task_head_trainable():
    """A sequence classifier's new head trains in full (as peft's modules_to_save); a pretrained
    LM head and the backbone get BitFit; train_head=False freezes the head's weights too."""
    from transformers import BertForMaskedLM, BertForQuestionAnswering, BertModel, GPT2ForSequenceClassification

    from sbpet.hf import task_head_parameter_names

    torch.manual_seed(0)
    model = BertForSequenceClassification(tiny_bert_config())
    names = apply_bitfit(model)
    assert {"classifier.weight", "classifier.bias"} <= set(names)
    assert all(n.endswith("bias") or n.startswith("classifier.") for n in names)
    assert not model.bert.pooler.dense.weight.requires_grad
    ids, mask, y = classification_batch()
    model(input_ids=ids, attention_mask=mask, labels=y).loss.backward()
    assert model.classifier.weight.grad is not None and model.classifier.weight.grad.abs().sum() > 0
    assert "classifier.weight" not in apply_bitfit(BertForSequenceClassification(tiny_bert_config()), train_head=False)
    question_answering = BertForQuestionAnswering(tiny_bert_config())
    assert task_head_parameter_names(question_answering) == ["qa_outputs.weight", "qa_outputs.bias"]
    assert task_head_parameter_names(GPT2ForSequenceClassification(tiny_gpt2_config())) == ["score.weight"]
    masked_lm = BertForMaskedLM(tiny_bert_config())
    assert task_head_parameter_names(masked_lm) == []  # a pretrained LM head
    assert "cls.predictions.transform.dense.weight" not in apply_bitfit(masked_lm)
    assert task_head_parameter_names(BertModel(tiny_bert_config())) == []
    assert task_head_parameter_names(torch.nn.Linear(2, 2)) == []


def test_autocast_leaves_r_in_float32():
    """Under bf16 autocast R from ``reg(...)`` and from the hooks is float32 and equals R computed
    without autocast on the same states: autocast never lowers g's precision (``precision=`` does)
    and never turns the context's float32 accumulation into bf16 matmuls."""
    model, base = _bert("lora")
    reg = tiny_regularizer(base, bridge="ou")
    ids, mask, y = classification_batch()
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    capture = BridgeCapture(model, reg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with capture.armed(labels, mask):
            out = model(input_ids=ids, attention_mask=mask, labels=y, output_hidden_states=True)
        hooked = capture.loss()
        full = reg(out.hidden_states, labels, mask)
    capture.remove()
    states = [h.detach() for h in out.hidden_states]
    want = reg(states, labels, mask)  # the same bf16 states, no autocast
    assert hooked.dtype == full.dtype == want.dtype == torch.float32
    torch.testing.assert_close(full, want, rtol=0, atol=0)
    torch.testing.assert_close(hooked, want, rtol=1e-6, atol=1e-6)


def test_hooks_and_module_take_the_device_cached_marginals(monkeypatch):
    """Both routes (hooks: BridgeCapture.loss; module: BridgeRegularizer.forward via bridge_loss)
    read the marginals from sbpet.core.bridges.marginals_on, computed on the host once per
    (bridge, L+1, device), never per step."""
    import sbpet.backends.api as api
    import sbpet.hf.capture as capture_module
    from sbpet.core import bridges

    model, base = _bert("lora")
    reg = tiny_regularizer(base)
    ids, mask, y = classification_batch()
    labels = masked_lm_bridge_labels(ids, y, MASK_ID, LABEL_WORDS)
    asked, computed = [], []
    real_on, real_marginals = bridges.marginals_on, type(reg.bridge).marginals

    def spy_on(bridge, num_states, device):
        asked.append(num_states)
        return real_on(bridge, num_states, device)

    monkeypatch.setattr(capture_module, "marginals_on", spy_on)
    monkeypatch.setattr(api, "marginals_on", spy_on)
    monkeypatch.setattr(type(reg.bridge), "marginals", lambda self, n: computed.append(n) or real_marginals(self, n))
    bridges._ON_DEVICE.clear()
    capture = BridgeCapture(model, reg)
    for _ in range(2):
        with torch.no_grad(), capture.armed(labels, mask):
            model(input_ids=ids, attention_mask=mask)
        capture.loss()
    capture.remove()
    with torch.no_grad():
        states = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
    for _ in range(2):
        reg(states, labels, mask)
    assert asked == [len(states)] * 4 and computed == [len(states)]
