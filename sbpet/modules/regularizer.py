"""BridgeRegularizer: the user-facing module (mapping g + tail + bridge + backend choice)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import tempfile
from collections.abc import Sequence

import torch
from torch import nn

from ..backends.api import bridge_loss
from ..core.bridges import get_bridge
from ..backends.dispatch import check_backend_name
from ..core.mapping import BridgeMapping, resolve_tail
from ..core.seeding import check_seed, seeded_init
from ..core.precision import check_precision
from ..core.validation import check_int
from ..core.files import atomic_write, write_json
from ..core.fingerprint import compare_fingerprints, embedding_fingerprint

__all__ = ["BridgeRegularizer", "CONFIG_NAME", "WEIGHTS_NAME", "check_model_matches", "model_name"]

CONFIG_NAME = "sbpet_config.json"
WEIGHTS_NAME = "sbpet_model.safetensors"


class BridgeRegularizer(nn.Module):
    """The stochastic-bridge regulariser R as an ``nn.Module`` (METHOD.md steps 1-8).

    Args:
        hidden_size: H of the PLM.
        num_layers: L; the PLM gives L+1 hidden states (embeddings + one per layer).
        dims: widths of g's Linear layers; the last is the latent size D.
        bridge: ``"brownian"`` or ``"ou"``.
        tail: [V, D] tail points, or
        word_embeddings: the PLM's input word-embedding matrix [V, H] (or nn.Embedding); the tail
            is its PCA (METHOD.md step 4). Give exactly one of the two.
        train_tail: make the tail a trainable parameter instead of a buffer.
        ignore_index: label value of positions that are not regularised.
        shift_labels: causal LMs: the state at position s is paired with label s+1.
        full_nll: add log-variance and 2*pi terms (a true negative log-likelihood).
        backend: ``"auto"``, ``"reference"``, ``"torch"`` or ``"triton"`` (see
            :mod:`sbpet.backends.dispatch`); used by ``forward`` and by the hooks of BridgeCapture /
            BridgeTrainer / fit_mapping unless they are given their own.
        precision: how g's matrix products run: ``"fp32"`` (default), ``"tf32"`` or ``"bf16"``
            (see :mod:`sbpet.core.precision` and docs/precision.md).
        name_or_path: the PLM's name or path, recorded in the saved config.
        seed: None draws g's initial weights from the global RNG (``torch.manual_seed`` before
            building decides them); an int draws them from the CPU generator seeded with it
            (:func:`seeded_init`), so two regularisers built with the same seed start from
            bit-identical g, and the global RNG is left as it was. Saved in the config.

    ``forward(hidden_states, labels, attention_mask=None)`` returns the scalar R; hidden_states
    is the Hugging Face tuple of L+1 tensors [B, S, H] or one stacked [L+1, B, S, H] tensor.
    ``backend`` and ``precision`` are plain attributes: set them to change later calls.

    Example:
        >>> reg = BridgeRegularizer(16, num_layers=2, dims=(32, 4), word_embeddings=torch.randn(50, 16))
        >>> states = tuple(torch.randn(2, 7, 16) for _ in range(3))
        >>> labels = torch.full((2, 7), -100); labels[0, 2] = 11
        >>> reg(states, labels, torch.ones(2, 7)).shape
        torch.Size([])
    """

    def __init__(
        self,
        hidden_size: int,
        num_layers: int,
        dims: Sequence[int] = (1024, 256, 128),
        bridge: str = "brownian",
        tail: torch.Tensor | None = None,
        word_embeddings: torch.Tensor | None = None,
        train_tail: bool = False,
        ignore_index: int = -100,
        shift_labels: bool = False,
        full_nll: bool = False,
        backend: str = "auto",
        name_or_path: str | None = None,
        precision: str = "fp32",
        seed: int | None = None,
    ):
        super().__init__()
        num_layers = check_int(num_layers, "num_layers", minimum=0)
        ignore_index = check_int(ignore_index, "ignore_index")
        check_backend_name(backend)
        check_precision(precision)
        check_seed(seed)
        self.bridge = get_bridge(bridge)
        with seeded_init(seed):
            self.mapping = BridgeMapping(hidden_size, dims)
        tail_points = resolve_tail(tail, word_embeddings, self.mapping.latent_size)
        if train_tail:
            self.tail = nn.Parameter(tail_points)
        else:
            self.register_buffer("tail", tail_points)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.ignore_index = int(ignore_index)
        self.shift_labels = bool(shift_labels)
        self.full_nll = bool(full_nll)
        self.backend = backend
        self.precision = precision
        self.config = {
            "kind": self.kind,
            "hidden_size": self.hidden_size,
            "num_layers": self.num_layers,
            "dims": list(self.mapping.dims),
            "bridge": self.bridge.name,
            "vocab_size": int(tail_points.shape[0]),
            "train_tail": bool(train_tail),
            "ignore_index": self.ignore_index,
            "shift_labels": self.shift_labels,
            "full_nll": self.full_nll,
            "backend": backend,
            "precision": precision,
            "name_or_path": name_or_path,
            "seed": seed,
        }
        fingerprint = embedding_fingerprint(word_embeddings) if word_embeddings is not None else None
        if fingerprint is not None:  # which PLM this g is for (sbpet.core.fingerprint)
            self.config["model_fingerprint"] = fingerprint

    @property
    def vocab_size(self) -> int:
        return self.tail.shape[0]

    def forward(self, hidden_states, labels, attention_mask=None, position_ids=None, *, backend: str | None = None,
                precision: str | None = None, max_positions: int | None = None, seq_idx=None,
                cu_seq_lens=None) -> torch.Tensor:
        """R of ``hidden_states`` (L+1 tensors [B, S, H] or [L+1, B, S, H]) for ``labels`` [B, S];
        ``backend`` / ``precision`` override the module's own for this call; ``max_positions``: see
        :func:`sbpet.bridge_loss`. Packed rows: ``position_ids`` [B, S] (or TRL's ``seq_idx``,
        flash-attention's ``cu_seq_lens_q`` as ``cu_seq_lens``; :func:`sbpet.hf.packing_arguments`
        picks them from a batch): one context per sequence, as :func:`sbpet.bridge_loss` says.

        Example:
            >>> out = model(**batch, output_hidden_states=True)   # a padding-free batch
            >>> r = regularizer(out.hidden_states, labels, None, batch["position_ids"])"""
        return bridge_loss(
            hidden_states,
            labels,
            attention_mask,
            self.mapping,
            self.tail,
            self.bridge,
            ignore_index=self.ignore_index,
            shift_labels=self.shift_labels,
            full_nll=self.full_nll,
            backend=self.backend if backend is None else backend,
            precision=self.precision if precision is None else precision,
            num_layers=self.num_layers,
            max_positions=max_positions,
            position_ids=position_ids,
            cu_seq_lens=cu_seq_lens,
            seq_idx=seq_idx,
        )

    def extra_repr(self) -> str:
        return (
            f"bridge={self.bridge.name!r}, num_layers={self.num_layers}, "
            f"vocab_size={self.vocab_size}, backend={self.backend!r}, precision={self.precision!r}"
        )

    # ----------------------------------------------------------------------------------------
    # Save / load: safetensors weights + a JSON config.

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``sbpet_config.json`` and ``sbpet_model.safetensors`` into ``directory``.

        A reader never sees half a g: a new folder is written under a temporary name beside it and
        renamed into place; in an existing folder each file is replaced atomically (weights, then
        config) and the config records the weights' SHA-256, which :meth:`from_pretrained` checks,
        so a pair from two different saves is an error, never a silent mix. Only these two files
        are written; whatever else the folder holds stays."""
        from safetensors.torch import save

        directory = os.fspath(directory)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        blob = save(state, metadata={"format": "pt"})
        config = {**self.config, "weights_sha256": hashlib.sha256(blob).hexdigest()}
        if not os.path.exists(directory):
            parent = os.path.dirname(os.path.abspath(directory))
            os.makedirs(parent, exist_ok=True)
            temp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(directory))}.", suffix=".tmp",
                                    dir=parent)
            try:
                _write_pair(temp, blob, config)
                os.rename(temp, directory)  # atomic; fails when another process made the folder meanwhile
                return
            except OSError:
                if not os.path.isdir(directory):
                    raise
            finally:
                shutil.rmtree(temp, ignore_errors=True)
        _write_pair(directory, blob, config)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model=None, *, trainable: bool = False, **overrides):
        """Load a regulariser saved with :meth:`save_pretrained`.

        ``model`` (a Hugging Face model or its config), if given, is checked against the saved
        hidden size, number of layers and vocabulary size, and (a model, not a config) against the
        saved fingerprint of its word embeddings (:mod:`sbpet.core.fingerprint`: another model or
        vocabulary order is an error naming both; a model fine-tuned from the same base, a
        warning). ``overrides`` replace config entries that do not change the weights' shapes
        (e.g. ``backend``). A missing, damaged or mismatching file raises ValueError naming what
        is wrong; the config is checked against the weights file's header (shapes, read without
        loading) on the meta device before anything is allocated.

        The module comes back in eval mode, as a transformers model does from ``from_pretrained``,
        and frozen (``requires_grad`` False on g and on a trainable tail): a fitted g is a fixed
        part of the loss during tuning (METHOD.md). ``trainable=True`` returns it as built
        instead (train mode, g and a ``train_tail`` tail trainable) to train it further by hand;
        :func:`~sbpet.fit_mapping` unfreezes what it fits either way, and
        :class:`~sbpet.BridgeTrainer` freezes it either way.

        Example:
            >>> reg.save_pretrained("g")
            >>> reg = BridgeRegularizer.from_pretrained("g", model=model)
        """
        from safetensors import SafetensorError
        from safetensors.torch import load

        config_path = os.path.join(directory, CONFIG_NAME)
        weights_path = os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise ValueError(f"{path} does not exist: not a saved sbpet regulariser")
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{config_path} is damaged (not valid JSON): {exc}") from exc
        if not isinstance(config, dict):
            raise ValueError(f"{config_path} is damaged: expected a JSON object")
        kind = config.get("kind", "pdf")
        target = cls._class_for_kind(kind)
        if model is not None:
            check_model_matches(config, model, f"the regulariser in {directory}")
        header = _safetensors_shapes(weights_path)
        expected_sha = config.pop("weights_sha256", None)
        fingerprint = config.pop("model_fingerprint", None)
        config.update(overrides)
        target._check_config_against(config, header, config_path, weights_path)
        with open(weights_path, "rb") as f:
            blob = f.read()
        if expected_sha is not None and hashlib.sha256(blob).hexdigest() != expected_sha:
            raise ValueError(f"{weights_path} is not the file {config_path} was saved with (its SHA-256 differs): "
                             "the folder was written by two saves at once or torn by a crash; save or fit the g "
                             "again")
        try:
            state = load(blob)
        except (SafetensorError, OSError, ValueError) as exc:
            raise ValueError(f"{weights_path} is damaged: {exc}") from exc
        module = target._from_config_and_state(config, state, weights_path)
        if fingerprint is not None:
            module.config["model_fingerprint"] = fingerprint
        if not trainable:
            module.requires_grad_(False)
            module.eval()
        return module

    @classmethod
    def _check_config_against(cls, config: dict, header: dict, config_path: str, weights_path: str) -> None:
        """Build the module of ``config`` on the meta device (no memory) and compare its tensors'
        shapes with the weights file's ``header`` (name -> shape): ValueError naming the entry."""
        args = {k: v for k, v in config.items() if k not in ("kind", "vocab_size")}
        tail = header.get("tail")
        if tail is None or len(tail) != 2:
            raise ValueError(f"{weights_path} is damaged: it holds no [V, D] 'tail'")
        try:
            with torch.device("meta"):
                module = cls(tail=torch.empty(tail, device="meta"), **args)
        except (TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise ValueError(f"{config_path} is not a valid configuration: {exc}") from exc
        built = {k: list(v.shape) for k, v in module.state_dict().items()}
        for name in sorted(set(built) | set(header)):
            if name not in header:
                raise ValueError(f"{config_path} describes a tensor {name!r} of shape {built[name]} that "
                                 f"{weights_path} does not hold: the config does not match the weights")
            if name not in built:
                raise ValueError(f"{weights_path} holds {name!r}, which the module of {config_path} has not: the "
                                 "config does not match the weights")
            if built[name] != header[name]:
                raise ValueError(f"{config_path} gives {name!r} the shape {built[name]} but {weights_path} holds "
                                 f"{header[name]}: the config does not match the weights (check its "
                                 f"{_config_entry(name)})")

    # kind (the saved config's "kind") -> class; every subclass that sets ``kind`` registers
    # itself, so loading needs no import of the subclass's module from here.
    kind = "pdf"
    _kinds: dict[str, type] = {}

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "kind" in cls.__dict__:
            BridgeRegularizer._kinds[cls.kind] = cls

    @staticmethod
    def _class_for_kind(kind: str):
        if kind == BridgeRegularizer.kind:
            return BridgeRegularizer
        if kind in BridgeRegularizer._kinds:
            return BridgeRegularizer._kinds[kind]
        raise ValueError(f"unknown regulariser kind {kind!r} in the saved config")

    @classmethod
    def _from_config_and_state(cls, config: dict, state: dict, weights_path: str):
        args = {k: v for k, v in config.items() if k not in ("kind", "vocab_size")}
        try:
            tail = state["tail"]
        except KeyError:
            raise ValueError(f"{weights_path} is damaged: it holds no 'tail'") from None
        try:
            module = cls(tail=tail, **args)
            module.load_state_dict(state)
        except (TypeError, RuntimeError) as exc:
            raise ValueError(f"{weights_path} does not match its config: {exc}") from exc
        return module


def _write_pair(directory: str, blob: bytes, config: dict) -> None:
    with atomic_write(os.path.join(directory, WEIGHTS_NAME), "wb") as f:
        f.write(blob)
    write_json(os.path.join(directory, CONFIG_NAME), config, indent=2)


def _safetensors_shapes(path: str) -> dict:
    """name -> shape of the tensors in a safetensors file, from its header alone (nothing else is
    read); ValueError for a damaged header."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > min(os.path.getsize(path) - 8, 100 * 2**20):
                raise ValueError(f"a header of {length} bytes")
            header = json.loads(f.read(length))
        return {k: list(v["shape"]) for k, v in header.items() if k != "__metadata__"}
    except (struct.error, ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path} is damaged (its safetensors header cannot be read: {exc})") from None


def _config_entry(tensor_name: str) -> str:
    if tensor_name == "tail":
        return "dims / latent_size and vocab_size"
    return "hidden_size and dims (or latent_size, width, depth)"


def model_name(model) -> str:
    """How a model is named in messages: its config's ``name_or_path``, else its class."""
    config = getattr(model, "config", model)
    name = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
    return f"the model {name!r}" if name else f"the {type(model).__name__}"


def _model_sizes(model) -> tuple[int, int, int]:
    config = getattr(model, "config", model)
    try:
        return int(config.hidden_size), int(config.num_hidden_layers), int(config.vocab_size)
    except AttributeError as exc:
        raise TypeError(
            f"model must be a Hugging Face model or config with hidden_size, num_hidden_layers and "
            f"vocab_size: {exc}"
        ) from exc


def _input_embeddings(model):
    get = getattr(model, "get_input_embeddings", None)
    if get is None:
        return None
    try:
        return get()
    except (NotImplementedError, AttributeError):
        return None


def check_model_matches(config: dict, model, where: str = "the regulariser") -> None:
    """Check a regulariser's ``config`` (its ``.config`` or a saved one) against ``model`` (a
    Hugging Face model, or its config for the sizes alone): hidden size, layer count and
    vocabulary size, then the fingerprint of the model's word embeddings when both have one
    (:func:`sbpet.core.fingerprint.compare_fingerprints`). ValueError naming both otherwise."""
    hidden, layers, vocab = _model_sizes(model)
    saved_for = config.get("name_or_path")
    fitted = f"{where}{f' (fitted for {saved_for!r})' if saved_for else ''}"
    for key, value in (("hidden_size", hidden), ("num_layers", layers), ("vocab_size", vocab)):
        if config.get(key) != value:
            raise ValueError(
                f"{fitted} was fitted for {key}={config.get(key)} but {model_name(model)} has {key}={value}"
            )
    if config.get("model_fingerprint") is not None:
        embeddings = _input_embeddings(model)
        if embeddings is not None:
            compare_fingerprints(config["model_fingerprint"], embedding_fingerprint(embeddings), fitted,
                                 model_name(model))


def check_fits_model(regularizer, model) -> None:
    """What hooks and trainers check before the first step: the regulariser's hidden size against
    ``model``'s (its config's ``hidden_size``, when it has one) and the fingerprint of the word
    embeddings it was fitted for against ``model``'s (another model or vocabulary order: a
    ValueError naming both; a model fine-tuned from the same base: a warning). The layer count is
    the caller's (it knows the layers). Nothing is checked where the model has no config."""
    config = getattr(model, "config", None)
    hidden = getattr(config, "hidden_size", None) if config is not None else None
    saved_for = regularizer.config.get("name_or_path")
    fitted = f"the regulariser{f' (fitted for {saved_for!r})' if saved_for else ''}"
    if isinstance(hidden, int) and hidden != regularizer.hidden_size:
        raise ValueError(f"{fitted} was built for hidden_size={regularizer.hidden_size} but {model_name(model)} has "
                         f"hidden_size={hidden}: use the g fitted for this model")
    saved = regularizer.config.get("model_fingerprint")
    embeddings = _input_embeddings(model) if saved is not None else None
    if embeddings is not None:
        compare_fingerprints(saved, embedding_fingerprint(embeddings), fitted, model_name(model))
