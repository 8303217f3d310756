"""CUDA-graph benchmark: what capturing a whole regularised training step in one CUDA graph buys.

One optimisation step of a ``BertForMaskedLM`` built from its config (random weights, no
download), BitFit-style (only the biases train, AdamW; the whole network is still run backwards),
one [MASK]-like position per sequence regularised towards a label word, and the same position's
masked-LM cross-entropy as the task loss. Variants, per backend set through the regulariser
(``torch``; ``triton`` on CUDA):

- ``exact``: eager, the labels on the host (pinned): the positions are found there, one
  non-blocking copy, what :class:`sbpet.BridgeTrainer` does;
- ``capacity``: eager, the labels copied to the device each step, ``BridgeCapture(...,
  max_positions=B)``: a fixed shape, positions found on the device;
- ``graph``: the ``capacity`` step captured once in a CUDA graph (after warm-up on a side stream)
  and replayed after copying the next labels into its static tensor (CUDA only);

and the step without the regulariser, eager and (CUDA) graphed, for the regulariser's cost in
each mode. Every step rotates through four label sets. Timing: the variants' steps interleaved
round by round (``train_step``'s loop: CUDA events on CUDA, the wall clock on the CPU), medians;
``syncs_per_step``: host synchronisations in one warm step (CUDA only; a replay should have none).

Correctness in the same run: every variant's first step starts from the same weights with the
same labels; R = (loss - loss without R) / alpha must be positive and every variant's first loss
within the autocast dtype's tolerance of the torch backend's exact step. (That a replay trains
like an eager step is ``tests/hf/test_graph_step.py``'s job, run on CUDA by ``gpu_check``.)

    python -m benchmarks.graph_step [--configs a,b] [--json OUT.json]   # prints the table
"""

from __future__ import annotations

import contextlib
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch

import sbpet
from benchmarks import suite
from benchmarks.measure import count_syncs, quiet_transformers, step_main, step_parser, time_interleaved

__all__ = ["GraphConfig", "GRAPH_CONFIGS", "CPU_GRAPH_CONFIGS", "GPU_GRAPH_CONFIGS", "run_config", "run",
           "render"]

ALPHA = 0.1
LABEL_SETS = 4


@dataclass(frozen=True)
class GraphConfig:
    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    batch: int
    seq: int
    vocab: int
    dims: tuple = suite.DIMS


GRAPH_CONFIGS = {c.name: c for c in (
    GraphConfig("tiny-bert-mlm", 64, 2, 2, 128, 4, 32, 1000, dims=(64, 32)),
    # bert-base at a small batch (launch-bound: where a graph should help most) and a GLUE-sized one
    GraphConfig("bert-base-b8-s64", 768, 12, 12, 3072, 8, 64, 30522),
    GraphConfig("bert-base-b32-s128", 768, 12, 12, 3072, 32, 128, 30522),
)}
CPU_GRAPH_CONFIGS = ("tiny-bert-mlm",)
GPU_GRAPH_CONFIGS = ("bert-base-b8-s64", "bert-base-b32-s128")


def _label_sets(config: GraphConfig, pinned: bool) -> list[torch.Tensor]:
    """LABEL_SETS label tensors [B, S]: one position per row (not the first or last token) with a
    label word, -100 elsewhere."""
    gen = torch.Generator().manual_seed(0)
    B, S = config.batch, config.seq
    out = []
    for _ in range(LABEL_SETS):
        labels = torch.full((B, S), -100)
        labels[torch.arange(B), torch.randint(1, S - 1, (B,), generator=gen)] = torch.randint(
            5, config.vocab, (B,), generator=gen)
        out.append(labels.pin_memory() if pinned else labels)
    return out


class _Trainee:
    """A seeded model, its optimizer and (backend not None) a frozen g and its capture."""

    def __init__(self, config: GraphConfig, device, backend: str | None, capacity: int | None, tails: dict):
        from transformers import BertConfig, BertForMaskedLM

        torch.manual_seed(0)
        hf = BertConfig(vocab_size=config.vocab, hidden_size=config.hidden, num_hidden_layers=config.layers,
                        num_attention_heads=config.heads, intermediate_size=config.intermediate,
                        max_position_embeddings=max(512, config.seq), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0)
        with torch.device(device):
            self.model = BertForMaskedLM(hf)
        biases = []
        for name, p in self.model.named_parameters():
            p.requires_grad_(name.endswith("bias"))
            if p.requires_grad:
                biases.append(p)
        self.optimizer = torch.optim.AdamW(biases, lr=1e-4, foreach=True, capturable=device.type == "cuda")
        self.capture = None
        if backend is not None:
            # The tail (a PCA of the embeddings: an SVD of [V, H]) once per configuration, on the host.
            if config.name not in tails:
                tails[config.name] = sbpet.BridgeRegularizer(
                    config.hidden, config.layers, dims=config.dims, seed=0,
                    word_embeddings=self.model.get_input_embeddings().weight.detach().float().cpu()).tail.detach()
            reg = sbpet.BridgeRegularizer(config.hidden, config.layers, dims=config.dims, tail=tails[config.name],
                                          backend=backend, seed=0).to(device).requires_grad_(False)
            self.capture = sbpet.BridgeCapture(self.model, reg, max_positions=capacity)
        self.device = device

    def step_body(self, ids, labels, task_labels):
        """Forward (armed), task loss + alpha R, backward, optimizer step; the loss (detached)."""
        autocast = torch.autocast("cuda", torch.bfloat16, cache_enabled=False) if self.device.type == "cuda" \
            else contextlib.nullcontext()
        with autocast:
            with self.capture.armed(labels) if self.capture is not None else contextlib.nullcontext():
                logits = self.model(input_ids=ids).logits
            task = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), task_labels.flatten(),
                                                     ignore_index=-100)
        loss = task + ALPHA * self.capture.loss() if self.capture is not None else task
        loss.backward()
        self.optimizer.step()
        return loss.detach()

    def close(self):
        if self.capture is not None:
            self.capture.remove()


def _make_step(trainee: _Trainee, mode: str, ids, host_labels: list, device):
    """A zero-argument step of ``mode`` ("exact", "capacity", "graph") cycling through the label
    sets; for "graph", captured here after warm-up."""
    counter = iter(range(10**9))
    if mode == "exact":
        def step():
            labels = host_labels[next(counter) % LABEL_SETS]
            trainee.optimizer.zero_grad(set_to_none=True)
            return trainee.step_body(ids, labels, labels.to(device, non_blocking=True))
        return step
    static = host_labels[0].to(device)
    if mode == "capacity":
        def step():
            static.copy_(host_labels[next(counter) % LABEL_SETS], non_blocking=True)
            trainee.optimizer.zero_grad(set_to_none=True)
            return trainee.step_body(ids, static, static)
        return step
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):  # warm-up: the first call checks values eagerly, Triton compiles
            trainee.optimizer.zero_grad(set_to_none=True)
            trainee.step_body(ids, static, static)
    torch.cuda.current_stream().wait_stream(side)
    trainee.optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = trainee.step_body(ids, static, static)

    def step():
        static.copy_(host_labels[next(counter) % LABEL_SETS], non_blocking=True)
        graph.replay()
        return static_loss
    step.graph = graph  # kept alive with the step
    return step


def _variants(device) -> list[tuple[str | None, str]]:
    backends = ["torch"] + (["triton"] if device.type == "cuda" else [])
    modes = ["exact", "capacity"] + (["graph"] if device.type == "cuda" else [])
    none = [(None, "exact")] + ([(None, "graph")] if device.type == "cuda" else [])
    return none + [(b, m) for b in backends for m in modes]


def run_config(config: GraphConfig, device, *, warmup: int = 2, min_rounds: int = 5, max_rounds: int = 50,
               seconds: float = 10.0, deadline: float | None = None, on_steps=None) -> list[dict]:
    """Check and time every variant of ``config``; one JSON-able record per variant. ``on_steps``:
    called with {variant: step function} of the variants that passed, before cleanup (the pytest
    entry hands one to pytest-benchmark)."""
    device = torch.device(device)
    base = {"benchmark": "graph_step", "config": config.name, "device": device.type,
            **{k: v for k, v in asdict(config).items() if k != "name"}, "capacity": config.batch,
            "autocast": "bf16" if device.type == "cuda" else "no", "alpha": ALPHA}
    records, trainees, steps, tails = {}, [], {}, {}
    for backend, mode in _variants(device):
        key = f"{backend or 'none'} {mode}"
        records[key] = dict(base, backend=backend or "none", mode=mode, syncs_per_step=None)
    if device.type == "cpu":
        for b, why in (("triton", "the Triton interpreter is a correctness mode: not timed"),):
            records[f"{b} -"] = dict(base, backend=b, mode="-", status="skipped", reason=why)
        records["graphs"] = dict(base, backend="-", mode="graph", status="skipped",
                                 reason="CUDA graphs need a CUDA device")
    pinned = device.type == "cuda"
    host_labels = _label_sets(config, pinned)
    ids = torch.randint(5, config.vocab, (config.batch, config.seq), generator=torch.Generator().manual_seed(1))
    ids = ids.to(device)
    with quiet_transformers():
        try:
            first = {}
            for backend, mode in _variants(device):
                key = f"{backend or 'none'} {mode}"
                trainee = _Trainee(config, device, backend, config.batch if mode != "exact" else None, tails)
                trainees.append(trainee)
                labels = host_labels[0] if mode == "exact" else host_labels[0].to(device)
                trainee.optimizer.zero_grad(set_to_none=True)
                # The first step, from the same weights and labels for every variant (eager: the check).
                first[key] = float(trainee.step_body(ids, labels, labels.to(device)))
                steps[key] = _make_step(trainee, mode, ids, host_labels, device)
            _check(records, first, device)
            live = {k: s for k, s in steps.items() if records[k].get("status") == "ok"}
            if device.type == "cuda":
                for k, s in live.items():
                    s()
                    records[k]["syncs_per_step"] = count_syncs(s, device)
            times = time_interleaved(live, device, min_rounds, max_rounds, seconds, warmup, deadline=deadline,
                                     cuda_events=True)
            _summarise(records, times)
            if on_steps is not None and live:
                on_steps(dict(live))
        except Exception as exc:  # recorded for every variant not yet measured
            status = "skipped" if suite.is_oom(exc) else "error"
            for r in records.values():
                if r.get("status") in (None, "ok") and "median_s" not in r:
                    r.update(status=status, reason=f"{type(exc).__name__}: {str(exc)[:300]}")
        finally:
            for t in trainees:
                t.close()
            trainees.clear()
            steps.clear()
            suite.free_device(device)
    return list(records.values())


def _check(records, first: dict, device):
    tol = suite.CHECK_TOLERANCE[torch.bfloat16 if device.type == "cuda" else torch.float32]
    yardstick = first["torch exact"]
    for key, loss in first.items():
        r = records[key]
        r["first_loss"] = loss
        problems = []
        if key.startswith("none"):
            problems += [] if loss == loss else [f"loss {loss}"]
        else:
            r["bridge_loss"] = (loss - first["none exact"]) / ALPHA
            r["check_error"] = abs(loss - yardstick) / max(abs(yardstick), 1e-30)
            if not r["bridge_loss"] > 0:
                problems.append(f"R = {r['bridge_loss']} (must be > 0)")
            if not r["check_error"] <= tol:
                problems.append(f"first loss {loss} vs the torch exact step's {yardstick} (> {tol:.0e} relative)")
        r.update(status="wrong" if problems else "ok", reason="; ".join(problems))


def _summarise(records, times):
    for key, t in times.items():
        records[key].update(median_s=statistics.median(t), min_s=min(t), rounds=len(t))
    for key, r in records.items():
        if "median_s" not in r:
            continue
        same_mode_none = records.get(f"none {'graph' if r['mode'] == 'graph' else 'exact'}", {})
        if r["backend"] != "none" and same_mode_none.get("median_s"):
            r["overhead"] = r["median_s"] / same_mode_none["median_s"] - 1
        eager = records.get(f"{r['backend']} exact", {})
        if r["mode"] != "exact" and eager.get("median_s"):
            r["vs_exact"] = eager["median_s"] / r["median_s"]  # > 1: faster than the eager exact step


def run(config_names, device, *, quick: bool = False, deadline: float | None = None, log=print,
        on_steps=None) -> list[dict]:
    """Every configuration in turn (skipped once ``deadline`` is near). ``quick``: one warm-up
    step, two rounds (smoke runs). ``on_steps``: as :func:`run_config`'s."""
    device = torch.device(device)
    settings = dict(warmup=1, min_rounds=2, max_rounds=2, seconds=0.0) if quick else (
        dict(warmup=3, min_rounds=10, seconds=10.0) if device.type == "cuda" else dict(warmup=2, min_rounds=5))
    unknown = [n for n in config_names if n not in GRAPH_CONFIGS]
    if unknown:
        raise ValueError(f"unknown graph-step configurations {unknown}: choose from {sorted(GRAPH_CONFIGS)}")
    records = []
    for name in config_names:
        if deadline is not None and time.monotonic() + 10 > deadline:
            records.append(dict(benchmark="graph_step", config=name, backend="-", mode="-", status="skipped",
                                reason="time budget spent"))
            continue
        log(f"graph step {name}")
        out = run_config(GRAPH_CONFIGS[name], device, deadline=deadline, on_steps=on_steps, **settings)
        for r in out:
            med = r.get("median_s")
            log(f"  {r['backend']:6s} {r['mode']:8s} {r.get('status', '?'):7s} "
                + (f"{med * 1e3:9.2f} ms" if med else str(r.get("reason", ""))[:150]))
        records += out
    return records


def render(records: list[dict]) -> str:
    """Markdown table of the records, and what was not measured."""
    lines = ["#### Training step in a CUDA graph: BertForMaskedLM, BitFit, one position per sequence", "",
             "| config | batch x seq | backend | mode | median ms | min ms | vs eager exact | regulariser cost "
             "| syncs/step | check |",
             "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- |"]
    skipped = []
    for r in records:
        if r.get("status") != "ok" or "median_s" not in r:
            skipped.append(f"- {r['config']} {r.get('backend')} {r.get('mode')}: {r.get('status')}: {r.get('reason')}")
            continue
        vs = f"{r['vs_exact']:.2f}x" if r.get("vs_exact") else "-"
        cost = f"{100 * r['overhead']:+.1f}%" if r.get("overhead") is not None else "-"
        syncs = "-" if r.get("syncs_per_step") is None else str(r["syncs_per_step"])
        check = f"R {r['bridge_loss']:.4g}, {r['check_error']:.1e}" if "bridge_loss" in r else \
            f"loss {r['first_loss']:.4g}"
        lines.append(f"| {r['config']} | {r['batch']}x{r['seq']} | {r['backend']} | {r['mode']} | "
                     f"{r['median_s'] * 1e3:.2f} | {r['min_s'] * 1e3:.2f} | {vs} | {cost} | {syncs} | {check} |")
    lines += ["", "vs eager exact: the same backend's eager step at exact positions / this step (> 1: faster). "
              "Regulariser cost: against the step without R in the same mode (eager or graph). Check: R of the "
              "first step and its loss's relative difference to the torch backend's exact step."]
    if skipped:
        lines += ["", "Not measured:", ""] + skipped
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = step_parser(__doc__, "GRAPH_CONFIGS").parse_args(argv)
    return step_main(args, "graph_step", GPU_GRAPH_CONFIGS, CPU_GRAPH_CONFIGS,
                     lambda names, device, log: run(names, device, quick=args.quick, log=log), render)


if __name__ == "__main__":
    sys.exit(main())
