"""One few-shot run of the demo, shared by ``sbpet train`` and ``sbpet study``: the setup (model,
corpus, the held-out test split, the cached fitted g), seeding, training with
:class:`~sbpet.BridgeTrainer` and evaluation.

Reproducibility: :func:`train_few_shot` seeds Python, NumPy and torch with the run's seed before
it builds anything, the Trainer's data order uses the same seed, g is built with ``seed=`` (its
own generator) and the SDE regulariser's noise is reseeded for every run and every evaluation;
the CLI runs inside :func:`deterministic_algorithms`. So the same command with the same seed on
the same machine gives bit-identical losses and accuracy on the CPU. The last bits of a float32
matrix product depend on how the work is split between threads: a different
``torch.get_num_threads()`` (another machine, ``OMP_NUM_THREADS``, ``torch.set_num_threads``) may
change them, and a run records the thread count it used.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import replace

import torch

from . import cache, datasets, demo
from .cache import FIT_CURVE, read_fit_curve  # noqa: F401 - part of this module's interface
from .protocol import OURS, Protocol

__all__ = [
    "FIT_CURVE",
    "REGULARIZER_KINDS",
    "TEST_SPLIT_SEED",
    "Setup",
    "config_digest",
    "default_cache",
    "deterministic_algorithms",
    "evaluate",
    "read_fit_curve",
    "seed_everything",
    "train_few_shot",
    "trim_padding",
]

REGULARIZER_KINDS = ("pdf", "sde")
POSITIONS = ("mask", "all")  # which tokens R regularises in sbpet train (see train_few_shot)
TEST_SPLIT_SEED = 0  # the one test split of a corpus: never the run's seed


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy and torch (CPU and every GPU) with ``seed``."""
    from transformers import set_seed

    set_seed(int(seed))


@contextlib.contextmanager
def deterministic_algorithms():
    """Run the block under ``torch.use_deterministic_algorithms(True)``, restoring the previous
    setting afterwards. On the CPU the ops sbpet uses are deterministic anyway; on a GPU cuBLAS is
    asked for its deterministic workspace (``CUBLAS_WORKSPACE_CONFIG``, effective when set before
    CUDA starts), ``auto`` leaves out the Triton strategy that trains g with float32 atomics
    (``fused``; see :mod:`sbpet.backends.dispatch`), and an op without a
    deterministic implementation warns instead of stopping the run (``warn_only``). The variable
    is set for the block only (a value the user set is kept)."""
    workspace = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    if workspace is None:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        if workspace is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)


def config_digest(config: dict, length: int = 12) -> str:
    """A short hex digest of a JSON-serialisable configuration (order of keys ignored): the part
    of a cache or run folder's name that covers everything its readable part does not."""
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:length]


class Setup:
    """What every ``sbpet`` command shares, from its parsed options ``args``: the model folder,
    tokenizer, corpus, the held-out test split, the device, and the fitted g of each
    regulariser kind and bridge (cached under ``<cache>/g``).

    The test split (``args.test_per_class`` per class, drawn with :data:`TEST_SPLIT_SEED`) is
    the same for every seed and shot count, and g is fitted on the rest of the corpus as plain
    text, with ``args.fit_seed``: one g per PLM, corpus, kind, bridge and fitting budget, shared
    by every run. A run's few-shot and validation examples come from the rest (:meth:`sample`).

    Building it reads only the corpus, the tokenizer and the model's config (seconds), and
    checks what would otherwise fail after g is fitted: ValueError naming ``--data-dir``,
    ``--model-dir`` or ``--max-length``. A file of the corpus that is not valid UTF-8 is reported
    on stderr as a warning.
    """

    def __init__(self, args):
        import sys

        from transformers import AutoConfig, AutoTokenizer

        self.args = args
        self.model_dir = os.path.abspath(args.model_dir or demo.minilm_dir())
        self.cache = args.cache_dir or default_cache()
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = not args.no_progress
        self.dims = tuple(int(d) for d in str(args.dims).split(","))
        command = f"sbpet {getattr(args, 'command', None) or ''}".strip()
        self.task = datasets.load_task(
            getattr(args, "dataset", "bbc"), args.data_dir,
            warn=lambda message: print(f"{command}: warning: {message}", file=sys.stderr))
        self.data_dir, self.examples, self.classes = self.task.source, self.task.examples, self.task.classes
        # Transformers' own errors here are long and name no option (a folder without a
        # tokenizer says "Couldn't instantiate the backend tokenizer ..."): keep their first line.
        try:
            self.model_config = AutoConfig.from_pretrained(self.model_dir)
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        except (OSError, ValueError, TypeError, KeyError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"--model-dir {self.model_dir}: not a Hugging Face model folder with a tokenizer "
                             f"({first})") from None
        # Without tokenizer files, transformers 5 builds a tokenizer of the special tokens alone.
        if len(self.tokenizer.get_vocab()) <= len(set(self.tokenizer.all_special_ids)):
            raise ValueError(f"--model-dir {self.model_dir}: holds no tokenizer (its vocabulary is only the "
                             "special tokens)")
        try:
            self.label_word_ids = demo.verbalizer_ids(self.tokenizer, self.task.label_words)
            overhead = demo.prompt_overhead(self.tokenizer, self.task.template)
        except ValueError as exc:
            raise ValueError(f"--model-dir {self.model_dir} with the data of {self.data_dir}: {exc}") from None
        if args.max_length <= overhead:
            raise ValueError(f"--max-length {args.max_length} leaves no room for the text: the prompt's [CLS], "
                             f"{self.task.template.format(mask='[MASK]')!r} and [SEP] take {overhead} tokens (use at "
                             f"least {overhead + 1})")
        self.check_positions(())
        self._tests: dict[int, tuple] = {}
        self._keys: dict[str, str] = {}

    # -- content keys (sbpet.cli.cache) ----------------------------------------------------------
    @property
    def model_key(self) -> str:
        """A digest of what the model folder holds, not of its path (:func:`~sbpet.cli.cache.model_key`)."""
        if "model" not in self._keys:
            self._keys["model"] = cache.model_key(self.model_dir, self.tokenizer)
        return self._keys["model"]

    @property
    def data_key(self) -> str:
        """A digest of the corpus itself (every example and the class names), not of its folder."""
        if "data" not in self._keys:
            self._keys["data"] = cache.content_key({"classes": list(self.classes),
                                                    "examples": [list(e) for e in self.examples]})
        return self._keys["data"]

    def fitting_key(self) -> str:
        """A digest of the texts g is fitted on (the corpus minus the test split), in order."""
        if "fitting" not in self._keys:
            self._keys["fitting"] = cache.content_key([t for t, _ in self.split()[0]])
        return self._keys["fitting"]

    # -- data ----------------------------------------------------------------------------------

    def check_positions(self, pets, virtual_tokens: int = demo.VIRTUAL_TOKENS) -> None:
        """ValueError naming ``--max-length`` when a prompt would not fit the model's positions
        (prompt tuning's virtual tokens take positions too, when ``pets`` holds "prompt"), or
        naming ``--pet prefix`` when the model's attention takes no key/value cache (read from its
        class, before any weights load)."""
        if "prefix" in pets:
            from transformers.models.auto.modeling_auto import MODEL_MAPPING

            from ..hf.prefix import prefix_tuning_support

            model_class = MODEL_MAPPING[type(self.model_config)] if type(self.model_config) in MODEL_MAPPING else None
            reason = None if model_class is None else prefix_tuning_support(model_class)  # else: apply_pet checks
            if reason is not None:
                raise ValueError(f"--pet prefix with --model-dir {self.model_dir}: {reason}")
        limit = getattr(self.model_config, "max_position_embeddings", None)
        extra = virtual_tokens if "prompt" in pets else 0
        if limit and self.args.max_length + extra > limit:
            why = f" + {extra} virtual tokens of prompt tuning" if extra else ""
            raise ValueError(f"--max-length {self.args.max_length}{why} exceeds the {limit} positions of the model "
                             f"in --model-dir {self.model_dir}")

    def check_sizes(self, shots, pets=(), virtual_tokens: int = demo.VIRTUAL_TOKENS) -> None:
        """ValueError naming the options when a class has fewer examples than the largest of
        ``shots`` plus ``--val-per-class`` plus ``--test-per-class``, or when a prompt of one of
        ``pets`` does not fit the model's positions (:meth:`check_positions`)."""
        self.check_positions(pets, virtual_tokens)
        a = self.args
        for option, value in (("--test-per-class", a.test_per_class), ("--val-per-class", a.val_per_class)):
            if value < 1:
                raise ValueError(f"{option} must be >= 1, got {value}")
        need = max(shots) + a.val_per_class + a.test_per_class
        counts = {name: 0 for name in self.classes}
        for _, label in self.examples:
            counts[self.classes[label]] += 1
        short = {name: n for name, n in counts.items() if n < need}
        if short:
            name, n = min(short.items(), key=lambda kv: kv[1])
            raise ValueError(
                f"--data-dir: class {name!r} has {n} examples, fewer than --shots {max(shots)} + "
                f"--val-per-class {a.val_per_class} + --test-per-class {a.test_per_class} = {need}"
            )

    def split(self, test_per_class: int | None = None):
        """(pool, test) for ``test_per_class`` (default ``args.test_per_class``); see
        :func:`~sbpet.cli.demo.held_out_split`."""
        count = self.args.test_per_class if test_per_class is None else int(test_per_class)
        if count not in self._tests:
            self._tests[count] = demo.held_out_split(self.examples, count, seed=TEST_SPLIT_SEED)
        return self._tests[count]

    @property
    def test(self) -> list:
        """The held-out test split, [(text, label)]."""
        return self.split()[1]

    def sample(self, shots: int, seed: int):
        """(train, validation) of a run: ``shots`` and ``args.val_per_class`` per class from the
        pool, drawn with ``seed`` (see :func:`~sbpet.cli.demo.few_shot_sample`)."""
        return demo.few_shot_sample(self.split()[0], shots, self.args.val_per_class, seed)

    def encode(self, rows):
        """[(text, label)] -> input_ids, attention_mask [N, max_length] and labels [N]."""
        ids, mask = demo.encode_prompts(self.tokenizer, [t for t, _ in rows], self.args.max_length, self.task.template)
        return ids, mask, torch.tensor([y for _, y in rows], dtype=torch.long)

    # -- models --------------------------------------------------------------------------------

    def encoder(self):
        """A fresh copy of the PLM on the device."""
        from transformers import AutoModel

        from ..hf.loading import load_pretrained_model

        return load_pretrained_model(AutoModel, self.model_dir).to(self.device)

    def build_classifier(self, pet: str, seed: int = 0, protocol: Protocol = OURS):
        """(PromptClassifier with ``pet`` applied as ``protocol`` says (virtual tokens, their init,
        LoRA's scale), initialised with ``seed``; its encoder; the verbalizer token ids)."""
        encoder = self.encoder()
        words = self.label_word_ids
        init = self.tokenizer.mask_token_id if protocol.prompt_init == "mask" else None
        pet_model = demo.apply_pet(encoder, pet, seed, virtual_tokens=protocol.virtual_tokens,
                                   lora_alpha=protocol.lora_alpha, prompt_init_id=init)
        classifier = demo.PromptClassifier(pet_model, self.tokenizer.mask_token_id, words)
        return classifier.to(self.device), encoder, words

    def g_config(self, bridge: str, kind: str = "pdf", fit_steps: int | None = None) -> dict:
        """Everything the fitted g depends on (its cache key); ``fit_steps`` None: ``--fit-steps``.
        The model and the fitting texts enter by content (:attr:`model_key`, :meth:`fitting_key`),
        not by path: a moved copy hits the cache, a changed folder refits."""
        if kind not in REGULARIZER_KINDS:
            raise ValueError(f"--regularizer must be one of {REGULARIZER_KINDS}, got {kind!r}")
        a = self.args
        steps = a.fit_steps if fit_steps is None else int(fit_steps)
        return {"model": self.model_key, "fitting_texts": self.fitting_key(), "kind": kind, "bridge": bridge,
                "dims": list(self.dims), "fit_steps": steps, "fit_batch_size": a.fit_batch_size,
                "fit_lr": a.fit_lr, "fit_seed": a.fit_seed, "max_length": a.max_length,
                "test_per_class": a.test_per_class, "test_split_seed": TEST_SPLIT_SEED,
                # fit_mapping runs the frozen PLM under bf16 autocast on CUDA (the key of a CPU g is unchanged)
                **({"backbone_dtype": "auto"} if self.device.type == "cuda" else {})}

    def g_dir(self, bridge: str, kind: str = "pdf", fit_steps: int | None = None) -> str:
        """The cache folder of the g of ``kind`` ("pdf" or "sde"), ``bridge`` and fitting budget."""
        name = os.path.basename(os.path.normpath(self.model_dir))
        digest = config_digest(self.g_config(bridge, kind, fit_steps))
        return os.path.join(self.cache, "g", f"{name}-{kind}-{bridge}-{digest}")

    def regularizer(self, bridge: str, encoder=None, kind: str = "pdf", force: bool = False,
                    fit_steps: int | None = None):
        """The fitted g of ``kind`` and ``bridge`` on the device: from the cache, or fitted now
        (``fit_steps`` steps, None: ``--fit-steps``; on the corpus minus the test split, PLM
        frozen, seeded with ``args.fit_seed``), saved with its fitting curve (``fit_curve.json``:
        R per step) and loaded back, so a fresh fit and a cached one are the same module.

        The g folder is locked while it is fitted and read: a second process waits, then uses it.
        ``force`` refits, removing ``<folder>/fit`` only if it holds just its own files."""
        from ..core.files import folder_lock, remove_owned, write_json
        from ..hf.fitting import CHECKPOINT_DIR_FILES, fit_mapping

        path = self.g_dir(bridge, kind, fit_steps)
        steps = self.g_config(bridge, kind, fit_steps)["fit_steps"]
        encoder = self.encoder() if encoder is None else encoder
        with folder_lock(path, on_wait=lambda: print(f"waiting for another process fitting the g in {path}")):
            if force or not os.path.isfile(os.path.join(path, "sbpet_config.json")):
                a = self.args
                reg = self.new_regularizer(bridge, kind, encoder)
                texts = [t for t, _ in self.split()[0]]
                print(f"fitting the {kind} g ({bridge} bridge; {steps} steps, {len(texts)} texts) -> {path}")
                if force:
                    remove_owned(os.path.join(path, "fit"), CHECKPOINT_DIR_FILES,
                                 " (--force removes only the fitting checkpoint sbpet wrote)")
                history = fit_mapping(
                    encoder, self.tokenizer, texts, reg, steps=steps, batch_size=a.fit_batch_size,
                    max_length=a.max_length, learning_rate=a.fit_lr, checkpoint_dir=os.path.join(path, "fit"),
                    save_every=50, seed=a.fit_seed, progress=self.progress,
                    backend=a.backend if kind == "pdf" else None,
                )
                reg.save_pretrained(path)
                losses = history["loss"]
                write_json(os.path.join(path, FIT_CURVE), {"steps": steps, "loss": losses})
                print(f"g fitted: R {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (last 10 steps)")
            else:
                print(f"using the cached g in {path}")
            return self._load(path, encoder, kind)

    def new_regularizer(self, bridge: str, kind: str, encoder):
        """An unfitted g of ``kind`` ("pdf" or "sde") and ``bridge`` for ``encoder``, with this
        setup's dims, backend, precision and fitting seed."""
        from ..modules.regularizer import BridgeRegularizer
        from ..modules.sde import SDEBridgeRegularizer

        config = encoder.config
        common = dict(bridge=bridge, word_embeddings=encoder.get_input_embeddings().weight,
                      name_or_path=self.model_dir, seed=self.args.fit_seed)
        if kind == "sde":
            return SDEBridgeRegularizer(config.hidden_size, config.num_hidden_layers, latent_size=self.dims[-1], **common)
        return BridgeRegularizer(config.hidden_size, config.num_hidden_layers, dims=self.dims,
                                 backend=self.args.backend, precision=self.args.precision, **common)

    def _load(self, path, encoder, kind):
        from ..modules.regularizer import BridgeRegularizer

        options = {"backend": self.args.backend, "precision": self.args.precision} if kind == "pdf" else {}
        return BridgeRegularizer.from_pretrained(path, model=encoder, **options).to(self.device)


def trim_padding(batch: dict) -> dict:
    """The batch without its trailing columns of padding (prompts are right-padded to
    ``--max-length``; short texts, as movie reviews, then cost what they hold). Read on the host,
    where the collated batch is."""
    length = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :length] if v.dim() == 2 else v for k, v in batch.items()}


def default_cache() -> str:
    """``$SBPET_CACHE`` or ``~/.cache/sbpet``."""
    return os.environ.get("SBPET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sbpet")


def train_few_shot(setup: Setup, pet: str, train_rows, seed: int, *, regularizer=None, alpha: float = 0.1,
                   epochs: float | None = None, batch_size: int | None = None, lr: float | None = None,
                   quiet: bool = False, positions: str = "mask", protocol: Protocol = OURS, validation_rows=None):
    """Train the prompt classifier with ``pet`` on ``train_rows`` with BridgeTrainer:
    ``task_loss + alpha * R`` (``regularizer`` None: the vanilla PET), as ``protocol`` says
    (:mod:`~sbpet.cli.protocol`; ``epochs`` / ``batch_size`` / ``lr``, when given, override its
    parts).

    Everything random comes from ``seed``: Python/NumPy/torch are seeded first, so the PET's
    initialisation, dropout and the data order are the same for every regulariser of a seed
    (the paired design of ``sbpet study``); an SDE regulariser's noise is reseeded with it.
    Our protocol: ``epochs`` epochs, linear warm-up over 10% of the steps then linear decay, no
    weight decay, dropout on, the last step kept. With ``protocol.eval_every`` the classifier is
    evaluated on ``validation_rows`` every that many steps and at the last, and the best state
    (highest accuracy, ties to the lower task loss, then the earlier step) is restored at the end.
    ``quiet`` hides the Trainer's progress bar and logs. ``positions``: ``"mask"`` regularises the
    [MASK] token towards its class's label word; ``"all"`` also every other real, non-special token
    towards its own id (:func:`~sbpet.hf.labels.every_token_bridge_labels`).

    Returns (classifier, verbalizer ids, mean training loss, selection): ``selection`` is None
    when the last step is kept, else ``{"chosen_step", "curve": [{"step", "accuracy",
    "task_loss"}]}``.
    """
    import tempfile

    from transformers import PrinterCallback, TrainerCallback, TrainingArguments

    from ..hf.labels import masked_lm_bridge_labels
    from ..hf.labels import every_token_bridge_labels
    from ..hf.trainer import BridgeTrainer

    protocol = replace(protocol, **{k: v for k, v in (("epochs", epochs), ("batch_size", batch_size), ("lr", lr))
                                    if v is not None})
    if positions not in POSITIONS:
        raise ValueError(f"--positions must be one of {', '.join(POSITIONS)}, got {positions!r}")
    if protocol.eval_every is not None and not validation_rows:
        raise ValueError("choosing the best checkpoint (eval_every) needs validation_rows")
    seed_everything(seed)
    classifier, _, words = setup.build_classifier(pet, seed, protocol)
    if not protocol.dropout:  # the released code trains in eval mode: no dropout anywhere
        for module in classifier.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    ids, mask, y = setup.encode(train_rows)
    bridge_labels = masked_lm_bridge_labels(ids, y, setup.tokenizer.mask_token_id, words)
    if positions == "all":
        bridge_labels = every_token_bridge_labels(ids, mask, bridge_labels, setup.tokenizer.all_special_ids)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i], "bridge_labels": bridge_labels[i]}
            for i in range(len(y))]
    collate = lambda rows: trim_padding({k: torch.stack([r[k] for r in rows]) for k in rows[0]})  # noqa: E731
    size = protocol.batch_size
    steps = protocol.steps or len(data) * protocol.epochs / size
    if regularizer is not None and hasattr(regularizer, "reseed"):
        regularizer.reseed(seed)
    linear = protocol.schedule == "linear"
    length = {"max_steps": protocol.steps} if protocol.steps else {"num_train_epochs": protocol.epochs}
    selector = None if protocol.eval_every is None else type("BestCheckpoint", (_BestCheckpoint, TrainerCallback), {})(
        classifier, setup.encode(validation_rows), words, setup.tokenizer.mask_token_id, protocol.eval_every)
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=size, learning_rate=protocol.learning_rate(pet), **length,
            warmup_steps=max(1, int(0.1 * steps)) if linear else 0, weight_decay=protocol.weight_decay,
            lr_scheduler_type="linear" if linear else "constant",
            logging_strategy="no" if quiet else "steps", logging_steps=max(1, int(steps / 5)),
            save_strategy="no", report_to=[], use_cpu=setup.device.type == "cpu", seed=seed, data_seed=seed,
            disable_tqdm=quiet or not setup.progress, remove_unused_columns=False,
        )
        trainer = BridgeTrainer(model=classifier, args=training_args, train_dataset=data, data_collator=collate,
                                bridge=regularizer, bridge_weight=alpha if regularizer is not None else 0.0,
                                callbacks=[selector] if selector else None)
        if quiet:
            trainer.remove_callback(PrinterCallback)
        result = trainer.train()
    selection = None if selector is None else selector.restore_best()
    return classifier, words, float(result.training_loss), selection


class _BestCheckpoint:
    """Mixed into a Trainer callback: validation accuracy and task loss every ``every`` steps and at the last;
    keeps a copy of the trainable parameters of the best step (the released code's choice:
    highest accuracy, ties to the lower loss; then the earlier step)."""

    def __init__(self, classifier, encoded, words, mask_token_id, every: int):
        self.classifier, self.encoded, self.words, self.mask_id, self.every = (
            classifier, encoded, words, mask_token_id, int(every))
        self.curve, self.best, self.best_state = [], None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every and state.global_step != state.max_steps:
            return
        training = self.classifier.training
        scores = evaluate(self.classifier, *self.encoded, self.words, self.mask_id)
        self.classifier.train(training)
        point = {"step": state.global_step, "accuracy": scores["accuracy"], "task_loss": scores["task_loss"]}
        self.curve.append(point)
        rank = (-point["accuracy"], point["task_loss"])
        if self.best is None or rank < (-self.best["accuracy"], self.best["task_loss"]):
            self.best = point
            self.best_state = {n: p.detach().clone() for n, p in self.classifier.named_parameters() if p.requires_grad}

    def restore_best(self) -> dict:
        with torch.no_grad():
            params = dict(self.classifier.named_parameters())
            for name, value in self.best_state.items():
                params[name].copy_(value)
        return {"chosen_step": self.best["step"], "curve": self.curve}


@torch.no_grad()
def evaluate(classifier, input_ids, attention_mask, labels, label_word_ids, mask_token_id, regularizers=None,
             shuffled: bool = False, batch_size: int = 32, noise_seed: int = 0) -> dict:
    """Accuracy, mean task (cross-entropy) loss and, for each regulariser in ``regularizers``
    (a dict name -> fitted g), the mean bridge loss R of the [MASK] token's paths ending at the
    label word's tail point.

    With ``shuffled``, also R of the same paths under mismatched endpoints: the labels shuffled
    across the examples with a fixed generator (seed 0), so the endpoints keep the label
    frequencies but not the pairing (with C balanced classes about 1/C of them still match).
    Each batch runs once with ``output_hidden_states``; the SDE regulariser's noise is reseeded
    with ``noise_seed`` first (common random numbers for every run scored).

    Returns ``{"accuracy", "task_loss", "bridge_loss": {name: R}, "shuffled_bridge_loss":
    {name: R}}`` (the last only with ``shuffled``).
    """
    from ..hf.capture import align_to_states, masked_lm_bridge_labels, num_virtual_tokens

    classifier.eval()
    regularizers = dict(regularizers or {})
    for reg in regularizers.values():
        if hasattr(reg, "reseed"):
            reg.reseed(noise_seed)
    device = next(classifier.parameters()).device
    virtual = num_virtual_tokens(classifier)
    targets = {"bridge_loss": labels}
    if shuffled:
        targets["shuffled_bridge_loss"] = labels[torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))]
    sums = {key: {name: 0.0 for name in regularizers} for key in targets}
    correct = task = 0.0
    for start in range(0, len(labels), batch_size):
        rows = slice(start, start + batch_size)
        batch = trim_padding({"input_ids": input_ids[rows], "attention_mask": attention_mask[rows]})
        ids, mask, y = batch["input_ids"].to(device), batch["attention_mask"].to(device), labels[rows].to(device)
        out = classifier(input_ids=ids, attention_mask=mask, labels=y, output_hidden_states=bool(regularizers))
        count = len(y)
        task += float(out.loss) * count
        correct += float((out.logits.argmax(-1) == y).sum())
        for key, ends in targets.items():
            bridge_labels = masked_lm_bridge_labels(ids, ends[rows].to(device), mask_token_id, label_word_ids)
            for name, reg in regularizers.items():
                aligned, aligned_mask = align_to_states(bridge_labels, mask, virtual, reg.ignore_index)
                sums[key][name] += float(reg(out.hidden_states, aligned, aligned_mask)) * count
    n = len(labels)
    metrics = {"accuracy": correct / n, "task_loss": task / n}
    metrics.update({key: {name: value / n for name, value in per.items()} for key, per in sums.items()})
    return metrics

