"""Hugging Face glue: capture what the regulariser needs with forward hooks, virtual tokens of
prompt tuning included (the bridge labels of the three setups live in :mod:`.labels`, re-exported
here).

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
from collections.abc import Mapping

import torch
from torch import nn

from ..backends import dispatch
from ..backends.api import add_normalising_terms
from ..core import checks
from ..core.bridges import marginals_on
from ..core.positions import find_positions, find_segments, to_device
from ..core.precision import autocast_off, check_precision
from ..core.validation import check_int, shift_labels_left
from .labels import causal_lm_bridge_labels, classification_bridge_labels, masked_lm_bridge_labels  # noqa: F401
from .prefix import enable_prefix_tuning, is_prefix_tuned

__all__ = [
    "BridgeCapture",
    "PACKING_KEYS",
    "packing_arguments",
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
# Packed rows

# A model-input key that marks packed rows' sequence boundaries -> the keyword of
# :meth:`BridgeCapture.armed`, :func:`sbpet.bridge_loss` and :class:`sbpet.BridgeRegularizer`.
PACKING_KEYS = {"position_ids": "position_ids", "seq_idx": "seq_idx", "cu_seq_lens_q": "cu_seq_lens"}


def packing_arguments(batch: Mapping) -> dict:
    """The packed-sequence keywords for :meth:`BridgeCapture.armed` (and :func:`sbpet.bridge_loss`)
    that a model-input dict carries: its ``position_ids`` [B, S], TRL's ``seq_idx`` [B, S] and
    flash-attention's ``cu_seq_lens_q`` [G + 1] (as ``cu_seq_lens``), whichever are tensors.
    Hand over the collator's host copies where there are some (no device read).

    Example:
        >>> with capture.armed(labels, batch.get("attention_mask"), **packing_arguments(batch)):
        ...     out = model(**batch)
    """
    return {argument: batch[key] for key, argument in PACKING_KEYS.items()
            if isinstance(batch.get(key), torch.Tensor)}


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
    the regularised rows [N, H], with autograd; with the torch backend (the default on CPU) it
    keeps less when gradients are on: the layer's share of R, whose autograd node holds a
    reference to the layer's states and recomputes g in the backward (memory flat when every token
    is regularised). Under ``torch.no_grad()`` (``fit_mapping``'s frozen PLM) it keeps the parts.

    Args:
        model: a ``PreTrainedModel``, ``PeftModel``, DDP wrapper or a module holding one.
        regularizer: a :class:`~sbpet.BridgeRegularizer` (the PDF regulariser); its
            ``shift_labels`` (causal LMs) and ``ignore_index`` apply.
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` for the capture and the
            loss (None: the regulariser's ``backend``); see :mod:`sbpet.backends.dispatch`.
        precision: ``"fp32"``, ``"tf32"`` or ``"bf16"`` for g's products (None: the
            regulariser's ``precision``).
        max_positions: a fixed capacity for the regularised positions (see
            :func:`sbpet.bridge_loss`; None: exact).

    Host syncs: none when the armed labels and mask lie on the CPU (the positions are found there
    and handed over in one non-blocking copy; :class:`BridgeTrainer` and ``fit_mapping`` arm them
    so) or with ``max_positions``, after the first call (which checks every value eagerly); see
    :mod:`sbpet.core.checks` for the deferred checks.

    Example:
        >>> capture = BridgeCapture(model, regularizer)
        >>> with capture.armed(labels, batch["attention_mask"]):   # labels [B, S], -100 elsewhere
        ...     out = model(**batch)
        >>> loss = out.loss + 0.1 * capture.loss()
        >>> capture.remove()                                        # when done
    """

    def __init__(self, model: nn.Module, regularizer, backend: str | None = None, precision: str | None = None,
                 max_positions: int | None = None):
        from ..modules.regularizer import BridgeRegularizer, check_fits_model

        if not isinstance(regularizer, BridgeRegularizer) or regularizer.config.get("kind", "pdf") != "pdf":
            raise TypeError(
                "BridgeCapture needs a BridgeRegularizer (the PDF regulariser); compute other "
                "regularisers from output_hidden_states"
            )
        self.regularizer = regularizer
        self.backend = dispatch.check_backend_name(regularizer.backend if backend is None else backend)
        self.precision = check_precision(regularizer.precision if precision is None else precision)
        self.max_positions = None if max_positions is None else check_int(max_positions, "max_positions", minimum=1)
        if is_prefix_tuned(model):  # peft's prefix tuning on transformers >= 5.24 (see .prefix)
            enable_prefix_tuning(model)
        from .models import check_model
        check_model(model, regularizer, find_backbone_and_layers)  # layers found, shift_labels suits the model
        self.backbone, self.layers = find_backbone_and_layers(model)
        self.num_virtual = num_virtual_tokens(model)
        if len(self.layers) != regularizer.num_layers:
            raise ValueError(
                f"the model has {len(self.layers)} layers but the regulariser was built for "
                f"num_layers={regularizer.num_layers}"
            )
        check_fits_model(regularizer, self.backbone)  # hidden size and word embeddings (issue 34)
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
        # Per layer: (context [B, H], rows [N, H]) on the parts route, or the layer's share of R (0-d)
        # on the recompute route (``self._layer_loss``, chosen by the forward's first layer).
        self._parts: dict[int, tuple[torch.Tensor, torch.Tensor] | torch.Tensor] = {}
        self._positions = None
        self._layer_loss = None
        self._ends = None

    @contextlib.contextmanager
    def armed(self, labels: torch.Tensor, attention_mask: torch.Tensor | None = None,
              position_ids: torch.Tensor | None = None, *, seq_idx: torch.Tensor | None = None,
              cu_seq_lens: torch.Tensor | None = None):
        """Record the next forward's parts for ``labels`` [B, S] (``ignore_index`` where not
        regularised; not yet shifted for causal LMs) and ``attention_mask`` [B, S] (None: all
        real). Call :meth:`loss` after the block.

        Packed rows (several sequences in one row, TRL's ``padding_free`` / ``packing``): give the
        batch's ``position_ids`` [B, S] (a 0 or a decrease starts a sequence), TRL's ``seq_idx``
        [B, S] or flash-attention's ``cu_seq_lens_q`` [G + 1] as ``cu_seq_lens``
        (:func:`packing_arguments` picks them from a batch): each sequence gets its own context
        and the causal shift stops at each sequence's end (:func:`sbpet.bridge_loss`). Hand over
        the collator's CPU tensors: found on the host, no device read."""
        self._set_positions(labels, attention_mask,
                            dict(position_ids=position_ids, seq_idx=seq_idx, cu_seq_lens=cu_seq_lens))
        self._armed = True
        try:
            yield self
        finally:
            self._armed = False

    def _set_positions(self, labels, attention_mask, packing=None):
        reg = self.regularizer
        if not isinstance(labels, torch.Tensor) or labels.dim() != 2:
            raise ValueError(
                f"labels must be a [B, S] tensor, got {getattr(labels, 'shape', type(labels).__name__)}"
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
        given_mask = attention_mask is not None
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
        packing = {k: v for k, v in (packing or {}).items() if v is not None}
        if packing and self.num_virtual:
            raise ValueError(f"{', '.join(packing)}: packed rows with {self.num_virtual} virtual tokens (prompt "
                             "learning) are not supported: the virtual tokens lead a row, not each sequence")
        labels, attention_mask = align_to_states(
            labels.long(), attention_mask, self.num_virtual, reg.ignore_index
        )
        real = attention_mask != 0  # boolean: any nonzero value is a real token, all weigh the same
        # no mask (padding-free batches): nothing to read back for the sequences
        segments = find_segments(real if given_mask else None, real.device, shape=tuple(real.shape),
                                 **packing) if packing else None
        if reg.shift_labels:
            labels = shift_labels_left(labels, reg.ignore_index, segments)
        device = self._states_device(labels.device)
        mode = checks.check_mode("capture", device)
        positions = find_positions(labels, real, device, vocab_size=reg.vocab_size, ignore_index=reg.ignore_index,
                                   route="capture", max_positions=self.max_positions, state_mode=mode,
                                   segments=segments)
        self._reset()
        segments = None if segments is None else segments.to(device)
        self._positions = (labels.shape, to_device(real, device), positions, mode, segments)

    def _states_device(self, fallback: torch.device) -> torch.device:
        """Where the layers' states will lie: the regulariser's device (g runs on them)."""
        tail = self.regularizer.tail
        return tail.device if tail.device.type != "cpu" else torch.device(fallback)

    # -- hooks --------------------------------------------------------------------------------

    def _record(self, index: int, states: torch.Tensor):
        if not self._armed or index in self._parts:
            return  # not armed, or a recompute (gradient checkpointing) of a recorded layer
        shape, mask, positions, _, segments = self._positions
        batch_index, seq_index = positions.batch_index, positions.seq_index
        if states.dim() != 3 or states.shape[:2] != shape:
            raise ValueError(
                f"layer {index} gave states of shape {tuple(states.shape)} but the armed labels "
                f"{self._label_shape} plus the model's {self.num_virtual} virtual tokens give "
                f"{tuple(shape)}: labels/attention_mask must be the batch's, before any virtual tokens"
            )
        device = states.device
        mask, batch_index, seq_index = (to_device(t, device) for t in (mask, batch_index, seq_index))
        extra = {} if segments is None else {"segments": segments.to(device)}
        batch, seq, hidden = states.shape
        key = (states.dtype, hidden, *dispatch.shape_key(batch, seq, batch_index.numel()), states.requires_grad,
               segments is not None)

        runners = dispatch.runners_for(lambda b, xs: b.capture_layer(xs[0], mask, batch_index, seq_index, **extra),
                                       [states])
        # The model may run under autocast; the context is accumulated in float32 regardless.
        with autocast_off(device):
            if not self._layer_loss:
                backend = dispatch.select("capture", self.backend, device, key, runners, atomics=False,
                                          padded=positions.padded)
                if self._layer_loss is None:  # the forward's first layer picks the route for all
                    # Under no_grad (fit_mapping's frozen PLM) the model keeps no state: references
                    # would keep whole layers alive where the parts keep [N, H] rows.
                    grad = torch.is_grad_enabled()
                    self._layer_loss = (dispatch.layer_loss_of(backend) if grad else None) or False
            if self._layer_loss:
                self._parts[index] = self._layer_share(index, states, mask, batch_index, seq_index, positions,
                                                       extra.get("segments"))
            else:
                self._parts[index] = backend.capture_layer(states, mask, batch_index, seq_index, **extra)

    def _layer_share(self, index, states, mask, batch_index, seq_index, positions, segments) -> torch.Tensor:
        """Layer ``index``'s unnormalised share of R as one autograd node that keeps a reference to
        the states (the model's own storage) and recomputes g in its backward (the backend's
        ``layer_loss``): nothing of g's activations and no copy of the rows is kept per layer."""
        reg, device = self.regularizer, states.device
        if self._ends is None:  # once per forward: the rows' tail ends (METHOD.md step 4), the marginals
            ends = reg.tail[to_device(positions.targets, device)]
            self._ends = (ends, *marginals_on(reg.bridge, reg.num_layers + 1, device))  # cached there
        ends, mean_coef, variance = self._ends
        num_valid = None if positions.num_valid is None else to_device(positions.num_valid, device)
        return self._layer_loss(states, mask, batch_index, seq_index, ends, mean_coef[index], variance[index],
                                reg.mapping, self.precision, num_valid, segments)

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
        _, _, positions, mode, _ = self._positions
        if self._layer_loss:
            loss = self._sum_of_shares(num_states, positions)
        else:
            loss = self._loss_from_parts(num_states, positions)
        if mode == "eager" and not bool(torch.isfinite(loss)):
            raise ValueError("R is not finite: a NaN or inf in the hidden states of a real token (attention_mask "
                             "nonzero), or g overflowed")
        if mode == "deferred":
            checks.defer("nonfinite", (~torch.isfinite(loss)).long())
        if reg.full_nll:
            num_valid = positions.num_valid
            num_valid = None if num_valid is None else to_device(num_valid, loss.device)
            loss = add_normalising_terms(loss, reg.bridge, num_states, reg.mapping.latent_size,
                                         positions.targets.numel(), num_valid)
        return loss

    def _sum_of_shares(self, num_states: int, positions) -> torch.Tensor:
        """R from the layers' shares (recompute route): their sum over the (L+1) * N pairs."""
        total = torch.stack([self._parts[i] for i in range(num_states)]).sum()
        self._reset()
        num_valid = positions.num_valid
        if num_valid is None:
            return total / max(num_states * positions.targets.numel(), 1)
        return total / (to_device(num_valid, total.device).clamp(min=1) * num_states).to(total.dtype)

    def _loss_from_parts(self, num_states: int, positions) -> torch.Tensor:
        """R from the layers' (context, rows) parts with the backend the dispatcher picks."""
        reg = self.regularizer
        contexts = [self._parts[i][0] for i in range(num_states)]
        tokens = [self._parts[i][1] for i in range(num_states)]
        self._reset()
        device = contexts[0].device
        # Each row's context: its sequence's (packed rows), else its row's.
        batch_index, targets = to_device(positions.context_index, device), to_device(positions.targets, device)
        mean_coef, variance = marginals_on(reg.bridge, num_states, device)  # cached there: no copy per call
        num_valid = positions.num_valid
        extra = {} if num_valid is None else {"num_valid": to_device(num_valid, device)}
        args = (batch_index, targets, reg.mapping, reg.tail, mean_coef, variance, self.precision)
        trains = (any(p.requires_grad for p in reg.mapping.parameters()), bool(reg.tail.requires_grad))
        key = (
            tokens[0].dtype, self.precision, num_states, contexts[0].shape[-1], tuple(reg.mapping.dims),
            *dispatch.shape_key(contexts[0].shape[0], targets.numel()),
            any(t.requires_grad for t in (*contexts, *tokens)), *trains,
        )

        params = [p for p in reg.mapping.parameters() if p.requires_grad] + [reg.tail]
        runners = dispatch.runners_for(
            lambda b, xs: b.loss_from_parts(xs[:num_states], xs[num_states:], *args, **extra), [*contexts, *tokens],
            params,
        )
        with autocast_off(device):
            # training g or the tail makes the fused strategy use atomics (not a deterministic candidate)
            backend = dispatch.select("parts", self.backend, device, key, runners, atomics=any(trains),
                                      padded=positions.padded)
            return backend.loss_from_parts(contexts, tokens, *args, **extra)

    def remove(self) -> None:
        """Remove the hooks."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
