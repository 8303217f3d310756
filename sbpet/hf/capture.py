"""Hugging Face glue: capture what the regulariser needs with forward hooks, and build the
regularised positions and labels for the three setups (prompt-based masked LM, sequence
classification, causal LM), virtual tokens of prompt tuning included.

Why hooks: ``output_hidden_states=True`` keeps every layer's [B, S, H] state alive and hands back
a tuple of all of them. The regulariser only needs, per layer, the context (a masked mean, METHOD.md
step 1) and the rows of the N regularised tokens (METHOD.md step 2). :class:`BridgeCapture` computes
exactly these two small tensors inside a forward hook on the embedding output and on each layer,
with autograd, and then computes R from the parts. Both steps go through the dispatcher
(:mod:`sbpet.backends.dispatch`: ``capture_layer`` and ``loss_from_parts`` of the chosen backend, so the
Triton kernels run here on CUDA). Same loss and gradients as the ``output_hidden_states`` path
(tested), without keeping or stacking the layers.

Alignment with virtual tokens: prompt tuning / p-tuning prepend P virtual tokens to the input
embeddings, so every layer sees S + P positions while ``labels`` and ``attention_mask`` cover S.
The regularised position s becomes s + P, and the context's mask gets P ones in front (the model
attends to the virtual tokens, so they are part of the sequence's context, exactly as peft
extends the attention mask). Prefix tuning puts its virtual tokens only in the attention's keys
and values: the layers' states keep S positions and nothing shifts.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence

import torch
from torch import nn

from ..backends import dispatch
from ..core.bridges import marginals_on
from ..core.precision import check_precision
from ..core.validation import shift_labels_left
from .prefix import enable_prefix_tuning, is_prefix_tuned

__all__ = [
    "BridgeCapture",
    "find_backbone_and_layers",
    "num_virtual_tokens",
    "align_to_states",
    "masked_lm_bridge_labels",
    "classification_bridge_labels",
    "causal_lm_bridge_labels",
]

_LAYER_LIST_NAMES = ("layer", "layers", "h", "block", "blocks")


# ----------------------------------------------------------------------------------------------
# Finding the backbone, its layers and the virtual tokens


def _unwrap(model: nn.Module):
    """Peel DDP/DataParallel, peft and task-head wrappers; return (backbone, peft_config)."""
    from transformers import PreTrainedModel

    try:
        from peft import PeftModel
    except ImportError:  # peft is optional for plain transformers models
        PeftModel = ()

    peft_config = None
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif PeftModel and isinstance(model, PeftModel):
            peft_config = model.active_peft_config
            model = model.get_base_model()
        elif isinstance(model, PreTrainedModel):
            backbone = model.base_model
            if backbone is model:
                return model, peft_config
            model = backbone
        else:
            # A user's module wrapping a Hugging Face model (e.g. a classifier head around it).
            inner = next(
                (
                    m
                    for m in model.modules()
                    if m is not model
                    and (isinstance(m, PreTrainedModel) or (PeftModel and isinstance(m, PeftModel)))
                ),
                None,
            )
            if inner is None:
                raise TypeError(
                    f"model must be a Hugging Face PreTrainedModel, a peft PeftModel or a module "
                    f"holding one; {type(model).__name__} holds neither"
                )
            model = inner
    raise TypeError(f"could not unwrap {type(model).__name__} to a Hugging Face backbone")


def find_backbone_and_layers(model: nn.Module) -> tuple[nn.Module, nn.ModuleList]:
    """The backbone (e.g. ``BertModel``, ``GPT2Model``) of ``model`` and its list of L layers.

    ``model`` may be a ``PreTrainedModel`` with or without a task head, a peft ``PeftModel``, a
    DDP wrapper or a user module holding one of these. The layers are the ``nn.ModuleList`` of
    ``config.num_hidden_layers`` blocks (``encoder.layer`` for BERT, ``h`` for GPT-2, ``layers``
    for Llama-style models).
    """
    backbone, _ = _unwrap(model)
    num_layers = getattr(backbone.config, "num_hidden_layers", None)
    candidates = [
        (name, module)
        for name, module in backbone.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) == num_layers
    ]
    named = [c for c in candidates if c[0].rsplit(".", 1)[-1] in _LAYER_LIST_NAMES]
    found = named or candidates
    if not found:
        raise ValueError(
            f"found no list of config.num_hidden_layers={num_layers} layers in "
            f"{type(backbone).__name__}"
        )
    return backbone, found[0][1]


def num_virtual_tokens(model: nn.Module) -> int:
    """How many virtual tokens the layers see in front of the real ones: P for peft prompt tuning,
    p-tuning and multitask prompt tuning; 0 for prefix tuning (its virtual tokens live only in the
    attention's keys/values), for every other peft method and for plain models."""
    _, config = _unwrap(model)
    if config is None or not getattr(config, "is_prompt_learning", False):
        return 0
    if str(getattr(config.peft_type, "value", config.peft_type)) == "PREFIX_TUNING":
        return 0
    return int(config.num_virtual_tokens)


def align_to_states(
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    num_virtual: int,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Labels and mask [B, S] -> [B, P + S] for layers that see ``num_virtual`` = P virtual
    tokens first: P ignored labels and P ones (real for the context) in front.

    Use it with ``output_hidden_states=True`` on a prompt-tuned model; :class:`BridgeCapture`
    does the same alignment itself.

    Example:
        >>> labels = torch.tensor([[-100, 7, -100]]); mask = torch.tensor([[1, 1, 0]])
        >>> align_to_states(labels, mask, 2)
        (tensor([[-100, -100, -100,    7, -100]]), tensor([[1, 1, 1, 1, 0]]))
    """
    if attention_mask is None:
        attention_mask = torch.ones_like(labels)
    if num_virtual < 0:
        raise ValueError(f"num_virtual must be >= 0, got {num_virtual}")
    if num_virtual == 0:
        return labels, attention_mask
    batch = labels.shape[0]
    pad_labels = labels.new_full((batch, num_virtual), ignore_index)
    pad_mask = attention_mask.new_ones((batch, num_virtual))
    return torch.cat([pad_labels, labels], 1), torch.cat([pad_mask, attention_mask], 1)


# ----------------------------------------------------------------------------------------------
# The capture


def _first_tensor(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, dict) or hasattr(value, "last_hidden_state"):
        return value["last_hidden_state"] if isinstance(value, dict) else value.last_hidden_state
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    raise TypeError(f"cannot find a hidden-state tensor in a {type(value).__name__}")


class BridgeCapture:
    """Collect the regulariser's inputs with forward hooks and compute R from them.

    Hooks: the input of the first layer (the embedding output, ``hidden_states[0]``), the output
    of layers 1..L-1 (``hidden_states[1..L-1]``) and the backbone's ``last_hidden_state``
    (``hidden_states[L]``, after a final norm where the model has one) — the same L+1 states as
    ``output_hidden_states=True``. Each hook keeps only the layer's context [B, H] (float32) and
    the regularised rows [N, H], with autograd.

    Args:
        model: a ``PreTrainedModel``, ``PeftModel``, DDP wrapper or a module holding one.
        regularizer: a :class:`~sbpet.BridgeRegularizer` (the PDF regulariser); its
            ``shift_labels`` (causal LMs) and ``ignore_index`` apply.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` for the capture and the
            loss (None: the regulariser's ``backend``); see :mod:`sbpet.backends.dispatch`.
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"`` for g's products (None: the
            regulariser's ``precision``).

    Example:
        >>> capture = BridgeCapture(model, regularizer)
        >>> with capture.armed(labels, batch["attention_mask"]):   # labels [B, S], -100 elsewhere
        ...     out = model(**batch)
        >>> loss = out.loss + 0.1 * capture.loss()
        >>> capture.remove()                                        # when done
    """

    def __init__(self, model: nn.Module, regularizer, backend: str | None = None, precision: str | None = None):
        from ..modules.regularizer import BridgeRegularizer

        if not isinstance(regularizer, BridgeRegularizer) or regularizer.config.get("kind", "pdf") != "pdf":
            raise TypeError(
                "BridgeCapture needs a BridgeRegularizer (the PDF regulariser); compute other "
                "regularisers from output_hidden_states"
            )
        self.regularizer = regularizer
        self.backend = dispatch.check_backend_name(regularizer.backend if backend is None else backend)
        self.precision = check_precision(regularizer.precision if precision is None else precision)
        if is_prefix_tuned(model):  # peft's prefix tuning on transformers >= 5.24 (see .prefix)
            enable_prefix_tuning(model)
        self.backbone, self.layers = find_backbone_and_layers(model)
        self.num_virtual = num_virtual_tokens(model)
        if len(self.layers) != regularizer.num_layers:
            raise ValueError(
                f"the model has {len(self.layers)} layers but the regulariser was built for "
                f"num_layers={regularizer.num_layers}"
            )
        self._armed = False
        self._handles = [
            self.layers[0].register_forward_pre_hook(self._first_layer_hook, with_kwargs=True)
        ]
        for index, layer in enumerate(self.layers[:-1], start=1):
            self._handles.append(layer.register_forward_hook(self._layer_hook(index)))
        self._handles.append(self.backbone.register_forward_hook(self._layer_hook(len(self.layers))))
        self._reset()

    # -- arming -------------------------------------------------------------------------------

    def _reset(self):
        self._parts: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._positions = None

    @contextlib.contextmanager
    def armed(self, labels: torch.Tensor, attention_mask: torch.Tensor | None = None):
        """Record the next forward's parts for ``labels`` [B, S] (``ignore_index`` where not
        regularised; not yet shifted for causal LMs) and ``attention_mask`` [B, S] (None: all
        real). Call :meth:`loss` after the block."""
        self._set_positions(labels, attention_mask)
        self._armed = True
        try:
            yield self
        finally:
            self._armed = False

    def _set_positions(self, labels, attention_mask):
        reg = self.regularizer
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ValueError(
                f"labels must be a [B, S] tensor, got {getattr(labels, 'shape', type(labels).__name__)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        if attention_mask is None:
            attention_mask = torch.ones_like(labels)
        if attention_mask.shape != labels.shape:
            raise ValueError(
                f"attention_mask {tuple(attention_mask.shape)} and labels {tuple(labels.shape)} "
                "must both be [B, S]"
            )
        self._label_shape = tuple(labels.shape)
        # Positions in the layers' coordinates: P virtual tokens first (ignored, real for the
        # context), then the causal shift, as peft's own task loss pairs them (the last virtual
        # token's state predicts the first real token).
        labels, attention_mask = align_to_states(
            labels.long(), attention_mask, self.num_virtual, reg.ignore_index
        )
        if reg.shift_labels:
            labels = shift_labels_left(labels, reg.ignore_index)
        regularised = labels != reg.ignore_index
        real = attention_mask != 0  # boolean: any nonzero value is a real token, all weigh the same
        empty, bad = torch.stack(
            [
                real.sum(1).eq(0).sum(),
                (regularised & ((labels < 0) | (labels >= reg.vocab_size))).sum(),
            ]
        ).tolist()
        if empty:
            raise ValueError(f"attention_mask has {empty} sequence(s) with no real token (all zero)")
        if bad:
            raise ValueError(
                f"labels must be in [0, {reg.vocab_size}) or ignore_index={reg.ignore_index}; "
                f"{bad} are outside"
            )
        batch_index, seq_index = regularised.nonzero(as_tuple=True)
        self._reset()
        self._positions = (
            labels.shape,
            real,
            batch_index,
            seq_index,
            labels[batch_index, seq_index],
        )

    # -- hooks --------------------------------------------------------------------------------

    def _record(self, index: int, states: torch.Tensor):
        if not self._armed or index in self._parts:
            return  # not armed, or a recompute (gradient checkpointing) of a recorded layer
        shape, mask, batch_index, seq_index, _ = self._positions
        if states.dim() != 3 or states.shape[:2] != shape:
            raise ValueError(
                f"layer {index} gave states of shape {tuple(states.shape)} but the armed labels "
                f"{self._label_shape} plus the model's {self.num_virtual} virtual tokens give "
                f"{tuple(shape)}: labels/attention_mask must be the batch's, before any virtual tokens"
            )
        device = states.device
        mask, batch_index, seq_index = mask.to(device), batch_index.to(device), seq_index.to(device)
        batch, seq, hidden = states.shape
        key = (states.dtype, hidden, *dispatch.shape_key(batch, seq, batch_index.numel()), states.requires_grad)

        runners = dispatch.runners_for(lambda b, xs: b.capture_layer(xs[0], mask, batch_index, seq_index), [states])
        # The model may run under autocast; the context is accumulated in float32 regardless.
        with torch.autocast(device.type, enabled=False):
            backend = dispatch.select("capture", self.backend, device, key, runners, atomics=False)
            self._parts[index] = backend.capture_layer(states, mask, batch_index, seq_index)

    def _first_layer_hook(self, module, args, kwargs):
        states = args[0] if args else kwargs.get("hidden_states")
        self._record(0, states)

    def _layer_hook(self, index: int):
        def hook(module, args, output):
            self._record(index, _first_tensor(output))

        return hook

    # -- the loss -----------------------------------------------------------------------------

    def loss(self) -> torch.Tensor:
        """R of the last armed forward (scalar, float32; autocast off). Clears the record."""
        if self._positions is None:
            raise RuntimeError("BridgeCapture.loss() needs an armed forward: use `with capture.armed(...)`")
        num_states = self.regularizer.num_layers + 1
        missing = [i for i in range(num_states) if i not in self._parts]
        if missing:
            self._reset()
            raise RuntimeError(
                f"the forward did not reach hidden states {missing}: was the model called inside "
                "`with capture.armed(...)`?"
            )
        reg = self.regularizer
        _, _, batch_index, _, targets = self._positions
        contexts = [self._parts[i][0] for i in range(num_states)]
        tokens = [self._parts[i][1] for i in range(num_states)]
        self._reset()
        device = contexts[0].device
        batch_index, targets = batch_index.to(device), targets.to(device)
        mean_coef, variance = marginals_on(reg.bridge, num_states, device)  # cached there: no copy per call
        args = (batch_index, targets, reg.mapping, reg.tail, mean_coef, variance, self.precision)
        trains = (any(p.requires_grad for p in reg.mapping.parameters()), bool(reg.tail.requires_grad))
        key = (
            tokens[0].dtype, self.precision, num_states, contexts[0].shape[-1], tuple(reg.mapping.dims),
            *dispatch.shape_key(contexts[0].shape[0], targets.numel()),
            any(t.requires_grad for t in (*contexts, *tokens)), *trains,
        )

        params = [p for p in reg.mapping.parameters() if p.requires_grad] + [reg.tail]
        runners = dispatch.runners_for(
            lambda b, xs: b.loss_from_parts(xs[:num_states], xs[num_states:], *args), [*contexts, *tokens], params
        )
        with torch.autocast(device.type, enabled=False):
            # training g or the tail makes the fused strategy use atomics (not a deterministic candidate)
            backend = dispatch.select("parts", self.backend, device, key, runners, atomics=any(trains))
            loss = backend.loss_from_parts(contexts, tokens, *args)
        if reg.full_nll and targets.numel():
            import math

            host_variance = reg.bridge.marginals(num_states)[1]  # a host number: no device read
            loss = loss + float(0.5 * reg.mapping.latent_size * torch.log(2 * math.pi * host_variance).mean())
        return loss

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []


# ----------------------------------------------------------------------------------------------
# Regularised positions and labels for the three setups


def _check_class_labels(class_labels: torch.Tensor, label_word_ids: Sequence[int], batch: int):
    if not isinstance(class_labels, torch.Tensor) or class_labels.shape != (batch,):
        raise ValueError(
            f"class_labels must be a [B] = [{batch}] tensor, got "
            f"{getattr(class_labels, 'shape', type(class_labels).__name__)}"
        )
    words = torch.as_tensor(list(label_word_ids), dtype=torch.long, device=class_labels.device)
    if words.dim() != 1 or words.numel() == 0:
        raise ValueError("label_word_ids must be a non-empty list of token ids, one per class")
    if bool(((class_labels < 0) | (class_labels >= words.numel())).any()):
        raise ValueError(f"class_labels must be in [0, {words.numel()}) (one label word per class)")
    return words[class_labels.long()]


def masked_lm_bridge_labels(
    input_ids: torch.Tensor,
    class_labels: torch.Tensor,
    mask_token_id: int,
    label_word_ids: Sequence[int],
    ignore_index: int = -100,
) -> torch.Tensor:
    """Prompt-based masked LM (the paper's setup): each sequence's [MASK] token is regularised
    towards its class's verbalizer word.

    Args:
        input_ids: [B, S] with exactly one ``mask_token_id`` per sequence.
        class_labels: [B] class indices; label_word_ids: the verbalizer's token id per class.

    Returns:
        [B, S] long: the label word id at the [MASK], ``ignore_index`` elsewhere.

    Example:
        >>> ids = torch.tensor([[101, 5, 103, 102], [101, 103, 7, 102]])
        >>> masked_lm_bridge_labels(ids, torch.tensor([1, 0]), 103, [2000, 3000])
        tensor([[-100, -100, 3000, -100],
                [-100, 2000, -100, -100]])
    """
    is_mask = input_ids == mask_token_id
    counts = is_mask.sum(1)
    if bool((counts != 1).any()):
        raise ValueError(
            f"every sequence needs exactly one mask token (id {mask_token_id}); counts "
            f"{counts.tolist()}"
        )
    words = _check_class_labels(class_labels, label_word_ids, input_ids.shape[0])
    labels = torch.full_like(input_ids, ignore_index, dtype=torch.long)
    labels[is_mask] = words
    return labels


def classification_bridge_labels(
    attention_mask: torch.Tensor,
    class_labels: torch.Tensor,
    label_word_ids: Sequence[int],
    position: str | int = "first",
    ignore_index: int = -100,
) -> torch.Tensor:
    """Sequence classification: one chosen position per sequence, regularised towards its class's
    label word.

    Args:
        attention_mask: [B, S] (1 for real tokens; padding on either side).
        class_labels: [B] class indices; label_word_ids: a token id per class.
        position: ``"first"`` (the first real token, e.g. BERT's [CLS]), ``"last"`` (the last
            real token, where a causal LM classifier reads its logits) or an int index.

    Returns:
        [B, S] long labels, ``ignore_index`` except at the chosen positions.

    Example:
        >>> mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
        >>> classification_bridge_labels(mask, torch.tensor([0, 1]), [11, 12], "last")
        tensor([[-100, -100,   11, -100],
                [-100, -100, -100,   12]])
    """
    batch, seq = attention_mask.shape
    words = _check_class_labels(class_labels, label_word_ids, batch)
    real = attention_mask != 0
    steps = torch.arange(seq, device=attention_mask.device).expand(batch, seq)
    if position == "first":
        index = torch.where(real, steps, seq).min(1).values
    elif position == "last":
        index = torch.where(real, steps, -1).max(1).values
    elif isinstance(position, int) and -seq <= position < seq:
        index = torch.full((batch,), position % seq, device=attention_mask.device)
    else:
        raise ValueError(f"position must be 'first', 'last' or an int in [-{seq}, {seq}), got {position!r}")
    if bool(((index < 0) | (index >= seq)).any()):
        raise ValueError("attention_mask has a sequence with no real token")
    labels = torch.full((batch, seq), ignore_index, dtype=torch.long, device=attention_mask.device)
    labels[torch.arange(batch, device=labels.device), index] = words
    return labels


def causal_lm_bridge_labels(
    input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, ignore_index: int = -100
) -> torch.Tensor:
    """Causal LM: the Hugging Face labels (input ids, padding ignored), to be used with a
    regulariser built with ``shift_labels=True`` so that the state at s predicts token s+1.

    Example:
        >>> causal_lm_bridge_labels(torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
        tensor([[   5,    6, -100]])
    """
    labels = input_ids.clone().long()
    if attention_mask is not None:
        labels[attention_mask == 0] = ignore_index
    return labels
