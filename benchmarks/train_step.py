"""Training-step benchmark: what the regulariser costs in one real ``sbpet.BridgeTrainer`` step.

One optimisation step of a Hugging Face model built from its config (random weights, no
download) with LoRA (peft, r=8) on the attention projections, timed without the regulariser
(``none``: ``BridgeTrainer(bridge=None)``, a plain Trainer) and with it for every backend set
through the regulariser (``BridgeRegularizer(..., backend=name)``: ``torch``, ``triton``,
``auto``). The regulariser's cost is ``(step with R - step without R) / step without R``.

A step is exactly what the Trainer's loop does per batch: ``trainer.training_step(model, batch)``
(forward with autocast, task loss + alpha * R, backward), gradient clipping to ``max_grad_norm``,
``optimizer.step()``, ``zero_grad``. The model is prepared once by the trainer's accelerator (bf16
autocast on CUDA, ``TrainingArguments(bf16=True)``; float32 on CPU); each variant has its own
trainer and AdamW optimizer over the same LoRA parameters. Timing: the variants' steps are
interleaved round by round (the order rotates every round) after warm-up steps; on CUDA each step
is timed with CUDA events after a ``torch.cuda.synchronize``, on CPU by the wall clock; medians.

Correctness in the same run: before timing, each variant runs one ``training_step`` from the same
weights and the same RNG state (same dropout masks). R = (loss with R - loss without R) / alpha
must be finite and positive, and every backend's loss and LoRA gradients must match the torch
backend's (normwise relative error within ``suite.CHECK_TOLERANCE`` of the hidden states' dtype);
a backend that disagrees is recorded as ``wrong`` and never timed. An explicit backend that cannot
run here raises ValueError: it is recorded as ``skipped`` with the reason.

    python -m benchmarks.train_step [--configs a,b] [--json OUT.json]   # prints the table

Configurations (``TRAIN_CONFIGS``): tiny BERT / Llama on CPU (seconds; the smoke run), and on CUDA
BERT-large at the ``bert-large-glue`` shape of ``suite.SHAPES`` and a Llama with H = 4096,
S = 2048 and 8 layers (the regulariser's cost and the model's both grow linearly in L, so the
ratio is that of the full depth up to the embedding and LM head).
"""

from __future__ import annotations

import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

import torch

import sbpet
from benchmarks import suite
from benchmarks.measure import count_syncs, quiet_transformers, step_main, step_parser, sync, time_interleaved

__all__ = ["TrainConfig", "TRAIN_CONFIGS", "CPU_TRAIN_CONFIGS", "GPU_TRAIN_CONFIGS", "VARIANTS",
           "run_config", "run"]

VARIANTS = ("none", "torch", "triton", "auto")
BRIDGE_WEIGHT = 0.1
LORA_RANK = 8
MAX_GRAD_NORM = 1.0  # the Trainer's default


@dataclass(frozen=True)
class TrainConfig:
    """One model and batch. ``arch``: "bert" (BertForSequenceClassification, GLUE-like: one
    regularised position per sequence, its first token, towards its class's label word, padded
    batch as in ``suite.make_labels``) or "llama" (LlamaForCausalLM: every token regularised,
    labels shifted, no padding). ``model_dtype``: the weights' dtype on CUDA (float32 on CPU).
    ``target``: the regulariser's cost to show (a fraction of the step), never asserted."""

    name: str
    arch: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    seq: int
    vocab: int
    dims: tuple = suite.DIMS
    model_dtype: str = "float32"
    target: float | None = None


_BERT = suite.SHAPES["bert-large-glue"]
TRAIN_CONFIGS = {
    c.name: c
    for c in (
        TrainConfig("tiny-bert-glue", "bert", 128, 2, 4, 512, 8, 64, 1000, dims=(256, 128, 64)),
        TrainConfig("tiny-llama-clm", "llama", 128, 2, 4, 344, 2, 128, 1000, dims=(256, 128, 64)),
        TrainConfig("bert-large-glue", "bert", _BERT.hidden, _BERT.layers, 16, 4096, _BERT.batch, _BERT.seq,
                    _BERT.vocab, target=0.05),
        TrainConfig("llama-h4096-l8-clm", "llama", 4096, 8, 32, 11008, 2, 2048, 32000, model_dtype="bfloat16",
                    target=0.15),
    )
}
CPU_TRAIN_CONFIGS = ("tiny-bert-glue", "tiny-llama-clm")
GPU_TRAIN_CONFIGS = ("bert-large-glue", "llama-h4096-l8-clm")


def build_model(config: TrainConfig, device: torch.device):
    """(peft model, base model) with random weights, LoRA on the attention projections."""
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if config.arch == "bert":
        hf_config = BertConfig(vocab_size=config.vocab, hidden_size=config.hidden, num_hidden_layers=config.layers,
                               num_attention_heads=config.heads, intermediate_size=config.intermediate,
                               max_position_embeddings=max(512, config.seq), num_labels=2)
        cls, task, targets = BertForSequenceClassification, TaskType.SEQ_CLS, ["query", "key", "value"]
    elif config.arch == "llama":
        hf_config = LlamaConfig(vocab_size=config.vocab, hidden_size=config.hidden, num_hidden_layers=config.layers,
                                num_attention_heads=config.heads, num_key_value_heads=config.heads,
                                intermediate_size=config.intermediate, max_position_embeddings=max(2048, config.seq))
        cls, task, targets = LlamaForCausalLM, TaskType.CAUSAL_LM, ["q_proj", "k_proj", "v_proj", "o_proj"]
    else:
        raise ValueError(f"unknown arch {config.arch!r}")
    with torch.device(device):  # initialise on the device: a 2B-parameter init on the host takes minutes
        base = cls(hf_config)
    if device.type == "cuda" and config.model_dtype != "float32":
        base.to(getattr(torch, config.model_dtype))
    lora = LoraConfig(task_type=task, r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=targets)
    return get_peft_model(base, lora), base


def make_batch(config: TrainConfig, device: torch.device) -> dict:
    """One batch with ``bridge_labels`` [B, S] as BridgeTrainer reads it: on the host (pinned when
    ``device`` is CUDA), as the Trainer's DataLoader hands it over; the Trainer moves it every step
    and the regulariser finds its positions on the host copy (no sync)."""
    gen = torch.Generator().manual_seed(0)
    B, S, V = config.batch, config.seq, config.vocab
    ids = torch.randint(5, V, (B, S), generator=gen)
    if config.arch == "bert":
        lengths = torch.tensor([S - (b * S) // (2 * B) for b in range(B)])
        mask = (torch.arange(S)[None, :] < lengths[:, None]).long()
        ids = ids.masked_fill(mask == 0, 0)
        classes = torch.randint(0, 2, (B,), generator=gen)
        bridge_labels = sbpet.classification_bridge_labels(mask, classes, [V // 3, 2 * V // 3], "first")
        batch = {"input_ids": ids, "attention_mask": mask, "labels": classes, "bridge_labels": bridge_labels}
    else:
        mask = torch.ones(B, S, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.clone(),
                 "bridge_labels": sbpet.causal_lm_bridge_labels(ids, mask)}
    return {k: v.pin_memory() if torch.device(device).type == "cuda" else v for k, v in batch.items()}


def _why_not(variant: str, device: torch.device) -> str | None:
    """None when ``variant`` can be timed on ``device``, else the reason it is skipped."""
    if variant == "none":
        return None
    try:
        resolved = sbpet.backends.api.resolve_backend(variant, device)
    except ValueError as exc:  # an explicit backend that cannot run here
        return f"ValueError: {exc}"
    if resolved == "triton" and device.type == "cpu":
        return ("triton on CPU runs only under the Triton interpreter (TRITON_INTERPRET=1), a correctness mode: "
                "not timed (the kernel benchmarks check it at the tiny shapes)")
    return None


def _trainer(model, regularizer, device, outdir, capture, compile_model: bool = False):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=outdir, per_device_train_batch_size=1, learning_rate=1e-4, report_to=[],
                             save_strategy="no", logging_strategy="no", disable_tqdm=True, seed=0,
                             max_grad_norm=MAX_GRAD_NORM, bf16=device.type == "cuda", use_cpu=device.type == "cpu",
                             dataloader_pin_memory=False, torch_compile=compile_model)
    trainer = sbpet.BridgeTrainer(model=model, args=args, bridge=regularizer, bridge_weight=BRIDGE_WEIGHT,
                                  capture=capture if regularizer is not None else None)
    trainer.create_optimizer()
    # What Trainer.train does before its loop: bf16 autocast around the forward (once per model).
    prepared, trainer.optimizer = trainer.accelerator.prepare(model, trainer.optimizer)
    return trainer, prepared


def _batch_items(trainer, batch, device):
    """What the Trainer's loop sets before each step: the accumulation count and the number of
    label tokens (the task loss's normaliser for models that accept it)."""
    samples, num_items = trainer.get_batch_samples(iter([batch]), 1, device)
    trainer.current_gradient_accumulation_steps = len(samples)
    return num_items


def _grads(model) -> torch.Tensor:
    return torch.cat([p.grad.detach().float().flatten() for p in model.parameters()
                      if p.requires_grad and p.grad is not None])


def run_config(config: TrainConfig, device, *, variants=VARIANTS, warmup: int = 2, min_rounds: int = 5,
               max_rounds: int = 50, seconds: float = 10.0, deadline: float | None = None,
               capture: str | None = None, precision: str = "fp32", on_steps=None,
               compile_model: bool = False) -> list[dict]:
    """Check and time one step of every variant of ``config``; one JSON-able record per variant.

    ``compile_model``: the model under ``torch.compile`` (the Trainer's ``torch_compile``, inductor;
    the hooks are traced into the graph), every variant alike; the warm-up steps compile.

    ``capture``: BridgeTrainer's ("hooks" or "hidden_states"; None: its default). ``precision``:
    the regulariser's (g's products: "fp32", the default, "tf32" or "bf16"). ``on_steps``:
    called with {variant: step function} of the variants that passed, before cleanup (the pytest
    entry hands one to pytest-benchmark). ``deadline`` (time.monotonic()) ends the rounds early.
    """
    device = torch.device(device)
    base_record = {"benchmark": "train_step", "config": config.name, "device": device.type,
                   "mixed_precision": "bf16" if device.type == "cuda" else "no",
                   "model_dtype": config.model_dtype if device.type == "cuda" else "float32",
                   **{k: v for k, v in asdict(config).items() if k != "name"}, "lora_rank": LORA_RANK,
                   "bridge_weight": BRIDGE_WEIGHT, "compiled": bool(compile_model), "syncs_per_step": None}
    if compile_model:  # one graph set per variant's hooks (static, then dynamic): more than dynamo's default 8
        from torch import _dynamo

        _dynamo.config.cache_size_limit = max(_dynamo.config.cache_size_limit, 64)
    records = {v: dict(base_record, variant=v, backend=None if v == "none" else v) for v in variants}
    if "none" not in records:
        raise ValueError("variants must include 'none' (the step without the regulariser)")
    for v, reason in ((v, _why_not(v, device)) for v in variants):
        if reason:
            records[v].update(status="skipped", reason=reason)
    trainers, steps = {}, {}
    model = base = model_prepared = batch = None
    setup_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as outdir, quiet_transformers():
        try:
            model, base = build_model(config, device)
            model_prepared = model
            batch = make_batch(config, device)
            params = sum(p.numel() for p in model.parameters())
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            num_positions = int((batch["bridge_labels"][:, 1:] if config.arch == "llama"
                                 else batch["bridge_labels"]).ne(-100).sum())
            for r in records.values():
                r.update(params=params, trainable_params=trainable, num_positions=num_positions)
            tail = None
            for v in variants:
                if records[v].get("status"):
                    continue
                try:
                    reg = None
                    if v != "none":
                        # As a user builds it. The tail (a PCA of the embeddings: one SVD of [V, H]) is
                        # computed once, on the host (LAPACK: seconds at V 32000 x H 4096, where a
                        # GPU SVD's time is hard to predict); BridgeTrainer moves it to the device.
                        source = dict(tail=tail) if tail is not None else dict(
                            word_embeddings=base.get_input_embeddings().weight.detach().float().cpu())
                        reg = sbpet.BridgeRegularizer(config.hidden, config.layers, dims=config.dims, backend=v,
                                                      shift_labels=config.arch == "llama", precision=precision,
                                                      **source)
                        tail = reg.tail.detach()
                        records[v].update(g_precision=precision,
                                          resolved_backend=sbpet.backends.api.resolve_backend(v, device))
                    trainers[v], model_prepared = _trainer(model, reg, device, outdir, capture, compile_model)
                    records[v]["capture"] = trainers[v].capture_mode if reg is not None else None
                except ValueError as exc:
                    records[v].update(status="skipped", reason=f"ValueError: {str(exc)[:300]}")
            records["none"]["setup_s"] = round(time.perf_counter() - setup_start, 2)
            _check(records, trainers, model_prepared, batch, device)
            for v, trainer in trainers.items():
                if records[v].get("status") == "ok":
                    steps[v] = _step_function(trainer, model_prepared, batch, device)
            if steps and device.type == "cuda":
                for v, step in steps.items():  # peak memory of one step (weights and optimizer included)
                    sync(device)
                    before = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                    step()
                    sync(device)
                    records[v]["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
                    # What the step itself allocates at its peak (MEMORY.md "On a GPU"): issue 35's ratio.
                    records[v]["step_peak_bytes"] = records[v]["peak_bytes"] - int(before)
                _memory_ratios(records)
                for v, step in steps.items():
                    records[v]["syncs_per_step"] = count_syncs(step, device)
            if steps:
                times = time_interleaved(steps, device, min_rounds, max_rounds, seconds, warmup, deadline=deadline,
                                         cuda_events=True)
                _summarise(records, times, device)
            if on_steps is not None and steps:
                on_steps(dict(steps))
        except Exception as exc:  # building, the check or timing failed: record it for every variant left
            status = "skipped" if suite.is_oom(exc) else "error"
            for r in records.values():
                if r.get("status") in (None, "ok") and "median_s" not in r:
                    r.update(status=status, reason=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            for trainer in trainers.values():
                if trainer._bridge_capture is not None:
                    trainer._bridge_capture.remove()
            trainers.clear()
            steps.clear()
            model = base = model_prepared = batch = None
            suite.free_device(device)
    return list(records.values())


def _memory_ratios(records: dict) -> None:
    """``step_memory_ratio``: each variant's step peak over the step without the regulariser's
    (issue 35: <= 1.15 when every token is regularised)."""
    base = records.get("none", {}).get("step_peak_bytes")
    for r in records.values():
        if base and r.get("step_peak_bytes") is not None:
            r["step_memory_ratio"] = r["step_peak_bytes"] / base


def _step_function(trainer, model, batch, device):
    params = list(model.parameters())
    num_items = _batch_items(trainer, batch, device)

    def step():
        loss = trainer.training_step(model, batch, num_items)
        trainer.accelerator.clip_grad_norm_(params, MAX_GRAD_NORM)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)
        return loss

    return step


def _check(records, trainers, model, batch, device):
    """One training_step per variant from the same weights and RNG state (same dropout masks): R > 0
    and finite, and every backend's loss and LoRA gradients within tolerance of the torch backend's.
    A first, unchecked step per regularised variant goes before: ``auto``'s one-time timing (which
    draws random numbers) and Triton's compilation happen there."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tol = suite.CHECK_TOLERANCE[dtype]
    for v, trainer in trainers.items():
        if records[v].get("status") or v == "none":
            continue
        known = set(_auto_choices())
        try:
            trainer.training_step(model, batch, _batch_items(trainer, batch, device))
        except ValueError as exc:  # an explicit backend refusing these inputs
            records[v].update(status="skipped", reason=f"ValueError: {str(exc)[:300]}")
        finally:
            model.zero_grad(set_to_none=True)
        chosen = {key[0]: name for key, name in _auto_choices().items() if key not in known}
        if v == "auto" and chosen:  # what auto's timing chose, per operation ("capture", "parts", ...)
            records[v]["auto_choice"] = ", ".join(f"{op} {name}" for op, name in sorted(chosen.items()))
    outputs = {}
    for v, trainer in trainers.items():
        if records[v].get("status"):
            continue
        torch.manual_seed(1234)
        loss = float(trainer.training_step(model, batch, _batch_items(trainer, batch, device)))
        outputs[v] = (loss, _grads(model))
        model.zero_grad(set_to_none=True)
        records[v]["loss"] = loss
    if "none" not in outputs or not math.isfinite(outputs["none"][0]):
        raise RuntimeError(f"the step without the regulariser gave loss {outputs.get('none', ('missing',))[0]}")
    yardstick = "torch" if "torch" in outputs else next((v for v in outputs if v != "none"), None)
    for v, (loss, grads) in outputs.items():
        r = records[v]
        if v == "none":
            r.update(status="ok", reason="")
            continue
        bridge = (loss - outputs["none"][0]) / BRIDGE_WEIGHT
        r["bridge_loss"] = bridge
        problems = [] if math.isfinite(bridge) and bridge > 0 else [f"R = {bridge} (must be finite and > 0)"]
        ref_loss, ref_grads = outputs[yardstick]
        loss_err = abs(loss - ref_loss) / max(abs(ref_loss), 1e-30)
        grad_err = float((grads - ref_grads).abs().max() / ref_grads.abs().max().clamp_min(1e-30))
        r.update(checked_against=yardstick, check_error=max(loss_err, grad_err))
        if not max(loss_err, grad_err) <= tol:
            problems.append(f"loss rel err {loss_err:.1e}, grad normwise rel err {grad_err:.1e} "
                            f"vs {yardstick} > {tol:.0e}")
        r.update(status="wrong" if problems else "ok", reason="; ".join(problems))


def _auto_choices() -> dict:
    """``auto``'s recorded choices (sbpet.backends.dispatch), key -> backend name; {} where there are none."""
    try:
        from sbpet.backends.dispatch import selector
    except ImportError:  # an sbpet without the dispatcher
        return {}
    return dict(selector.choices)


def _summarise(records, times, device):
    base = times.get("none")
    base_median = statistics.median(base) if base else None
    for v, t in times.items():
        r = records[v]
        r.update(median_s=statistics.median(t), min_s=min(t), rounds=len(t),
                 timing="cuda events, interleaved" if device.type == "cuda" else "interleaved wall-clock")
        if v != "none" and base_median:
            r["overhead"] = r["median_s"] / base_median - 1
            # Paired per round (the same round's step without R): steadier on a shared machine.
            r["overhead_paired"] = statistics.median(a / b - 1 for a, b in zip(t, base))


def run(config_names, device, *, quick: bool = False, deadline: float | None = None, log=print, **kwargs) -> list[dict]:
    """Every config in turn (skipped with the reason once ``deadline`` is near); all records.
    Defaults: 3 warm-up steps and at least 10 rounds on CUDA, 2 and 5 on CPU (``kwargs`` of
    :func:`run_config` override them). ``quick``: one warm-up step and two rounds (dry runs and
    smoke tests). CPU threads: ``SBPET_BENCH_THREADS``, else one thread when ``quick`` (on a shared
    2-core machine two threads made these steps 10-100x slower: an OpenMP barrier waiting for a
    descheduled thread); restored afterwards."""
    device = torch.device(device)
    threads = torch.get_num_threads()
    defaults = dict(warmup=3, min_rounds=10) if device.type == "cuda" else dict(warmup=2, min_rounds=5)
    if quick:
        defaults = dict(warmup=1, min_rounds=2, max_rounds=2, seconds=0.0)
    wanted = os.environ.get("SBPET_BENCH_THREADS") or ("1" if quick else None)
    if device.type == "cpu" and wanted:
        torch.set_num_threads(int(wanted))
    kwargs = dict(defaults, **kwargs)
    try:
        return _run(config_names, device, deadline, log, kwargs, reserve_s=5.0 if quick else 30.0)
    finally:
        torch.set_num_threads(threads)


def _run(config_names, device, deadline, log, kwargs, reserve_s: float) -> list[dict]:
    records = []
    unknown = [name for name in config_names if name not in TRAIN_CONFIGS]
    if unknown:
        raise ValueError(f"unknown training configurations {unknown}: choose from {sorted(TRAIN_CONFIGS)}")
    for name in config_names:
        config = TRAIN_CONFIGS[name]
        if deadline is not None and time.monotonic() + reserve_s > deadline:
            records += [dict(benchmark="train_step", config=name, variant=v, backend=None if v == "none" else v,
                             status="skipped", reason="time budget spent") for v in kwargs.get("variants", VARIANTS)]
            continue
        log(f"train step {name}: {', '.join(kwargs.get('variants', VARIANTS))}")
        out = run_config(config, device, deadline=deadline, **kwargs)
        for r in out:
            med = r.get("median_s")
            log(f"  {r['variant']:6s} {r.get('status', '?'):7s} "
                + (f"{med * 1e3:9.2f} ms" + (f"  {100 * r['overhead']:+.1f}%" if "overhead" in r else "")
                   + (f"  {r['syncs_per_step']} syncs" if r.get("syncs_per_step") is not None else "")
                   if med else str(r.get("reason", ""))[:150]))
        records += out
    return records


def main(argv=None) -> int:
    parser = step_parser(__doc__, "TRAIN_CONFIGS")
    parser.add_argument("--seconds", type=float, default=10.0, help="timing time per config (s)")
    parser.add_argument("--capture", default=None, choices=("hooks", "hidden_states"),
                        help="BridgeTrainer's capture (default: its own default)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "tf32", "bf16"),
                        help="the regulariser's precision for g's products (default fp32)")
    parser.add_argument("--compile", action="store_true", help="the model under torch.compile (inductor)")
    args = parser.parse_args(argv)
    from benchmarks.report import render_train_steps

    return step_main(args, "train_step", GPU_TRAIN_CONFIGS, CPU_TRAIN_CONFIGS,
                     lambda names, device, log: run(names, device, quick=args.quick, seconds=args.seconds,
                                                    capture=args.capture, precision=args.precision,
                                                    compile_model=args.compile, log=log),
                     render_train_steps)


if __name__ == "__main__":
    sys.exit(main())
