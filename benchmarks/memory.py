"""Peak tensor memory of one training step with and without the regulariser (issue 35, item 3).

One step is what ``BridgeTrainer`` does per batch on the hooks route: a Llama causal LM built from
its config (random weights, no download) with LoRA (r 8) on ``q_proj`` and ``v_proj``, every token
regularised (``causal_lm_bridge_labels``, ``shift_labels=True``), g of dims (1024, 256, 128) frozen,
``BridgeCapture`` around the forward, ``task_loss + alpha * R``, backward. "Without" is the same
step with no capture and the task loss only. The count (``/work/shared/MEMORY.md``):

- on the CPU, a ``TorchDispatchMode`` adds every new storage an op creates to a live total (each
  storage once, by identity, whatever views of it an op returns) and takes it off when the storage
  dies (``weakref.finalize``); every storage that exists before the step (weights, buffers, the
  batch, the regulariser) is marked as seen and never counted; the peak of the live total is the
  step's peak. One warm-up step first; the LoRA gradients are set to None before the counted step;
- at Llama-7B widths the same count runs with the model and the regulariser on the ``meta``
  device (no arithmetic, no data; the labels stay on the host so the positions are exact); a
  small shape run both ways checks that the two counts agree (``--check-meta``).

Every configuration runs in its own process (allocator caches and lazily built buffers of an
earlier run would leak into the next). ``--time`` also times the step with the recompute against
the save-everything path (``SBPET_TORCH_RECOMPUTE=0``), interleaved in one process.

    python -m benchmarks.memory [--configs NAMES] [--json OUT.json] [--md OUT.md] [--time]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import weakref
from dataclasses import asdict, dataclass, replace

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

__all__ = ["MemoryConfig", "CONFIGS", "StepTracker", "build", "count_step", "run_config", "main"]

BRIDGE_WEIGHT = 0.1
LORA_RANK = 8
DIMS = (1024, 256, 128)
RECOMPUTE_ENV = "SBPET_TORCH_RECOMPUTE"


@dataclass(frozen=True)
class MemoryConfig:
    """One model, batch and step. ``device``: "cpu" (counted with data) or "meta" (no data)."""

    name: str
    hidden: int
    layers: int
    heads: int
    intermediate: int
    seq: int
    vocab: int
    batch: int = 1
    checkpointing: bool = False
    backend: str = "torch"
    device: str = "cpu"


def _configs():
    # Llama proportions (intermediate 2.6875 H, head size 64). Vocabulary 1000 gives the issue's
    # 56 MiB step at H 1024 (the logits do not hide the regulariser); 32000 is Llama's.
    base = {
        "h1024": MemoryConfig("h1024", 1024, 4, 16, 2752, 512, 1000),
        "h1024-v32k": MemoryConfig("h1024-v32k", 1024, 4, 16, 2752, 512, 32000),
        "h256": MemoryConfig("h256", 256, 4, 4, 688, 512, 1000),
        "h4096-meta": MemoryConfig("h4096-meta", 4096, 2, 32, 11008, 512, 32000, device="meta"),
        "h4096-meta-v1k": MemoryConfig("h4096-meta-v1k", 4096, 2, 32, 11008, 512, 1000, device="meta"),
        "h4096-meta-s2048": MemoryConfig("h4096-meta-s2048", 4096, 2, 32, 11008, 2048, 32000, device="meta"),
        "small": MemoryConfig("small", 128, 2, 4, 344, 128, 1000),
        "small-meta": MemoryConfig("small-meta", 128, 2, 4, 344, 128, 1000, device="meta"),
    }
    out = {}
    for name, config in base.items():
        for ckpt in (True, False):
            full = f"{name}-{'ckpt' if ckpt else 'nockpt'}"
            out[full] = replace(config, name=full, checkpointing=ckpt)
    return out


CONFIGS = _configs()
DEFAULT_CONFIGS = ("h1024-ckpt", "h1024-nockpt", "h1024-v32k-ckpt", "h1024-v32k-nockpt", "h256-ckpt", "h256-nockpt",
                   "h4096-meta-ckpt", "h4096-meta-nockpt", "h4096-meta-v1k-ckpt", "h4096-meta-v1k-nockpt",
                   "h4096-meta-s2048-ckpt", "h4096-meta-s2048-nockpt")


class StepTracker(TorchDispatchMode):
    """Peak bytes of the storages created while the mode is on, beyond those of ``existing``.

    sbpet's custom ops are entered (as tests/memory_tracking.py does), so the buffers the Triton
    host code allocates are seen. Keys storages by identity (PyTorch keeps one Python object per storage while it lives), so it
    works on ``meta`` tensors too (their ``data_ptr()`` is 0)."""

    def __init__(self, existing=()):
        super().__init__()
        self._known: dict[int, object] = {}
        for t in existing:
            storage = t.untyped_storage()
            self._known[id(storage)] = storage  # held: pre-existing storages never count
        self.live = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = custom_ops._maybe_get_opdef(func) if func.namespace == "sbpet" else None
        if opdef is not None:
            with self:  # sbpet's custom ops (Triton host code): their Python bodies' buffers count
                out = opdef._init_fn(*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        return out

    def _add(self, storage):
        key, size = id(storage), storage.nbytes()
        if size == 0 or key in self._known:
            return
        self._known[key] = None
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key, size):
        if self._known.get(key, 0) is None:
            del self._known[key]
            self.live -= size


def _flash_attention_on_meta():
    """On ``meta``, SDPA falls back to its math path (the [B, heads, S, S] softmax saved for the
    backward); the CPU runs and GPUs take a flash kernel that saves [B, heads, S] statistics. Route
    the unmasked causal calls to the CPU flash op, whose meta kernel gives the same outputs as the
    CPU run (``--check-meta`` compares the two counts)."""
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def flash(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kwargs):
        if query.device.type != "meta" or attn_mask is not None or dropout_p or kwargs.get("enable_gqa"):
            return sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        **kwargs)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, is_causal,
                                                                          scale=scale)[0]

    torch.nn.functional.scaled_dot_product_attention = flash


def build(config: MemoryConfig, regularised: bool):
    """(model, capture or None, batch, existing tensors) for ``config``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    import sbpet

    if config.device == "meta":
        # transformers looks for packed sequences in the position ids, a host read (``.all()``) that
        # ``meta`` cannot answer; the batch is one unpacked row, so the answer is "none".
        from transformers import masking_utils

        masking_utils.find_packed_sequence_indices = lambda position_ids: None
        _flash_attention_on_meta()
    torch.manual_seed(0)
    hf_config = LlamaConfig(vocab_size=config.vocab, hidden_size=config.hidden, num_hidden_layers=config.layers,
                            num_attention_heads=config.heads, num_key_value_heads=config.heads,
                            intermediate_size=config.intermediate, max_position_embeddings=max(2048, config.seq))
    with torch.device(config.device):
        base = LlamaForCausalLM(hf_config)
    if config.checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    lora = LoraConfig(task_type=TaskType.CAUSAL_LM, r=LORA_RANK, lora_alpha=2 * LORA_RANK,
                      target_modules=["q_proj", "v_proj"])
    model = get_peft_model(base, lora)
    model.train()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, config.vocab, (config.batch, config.seq), generator=gen)
    mask = torch.ones_like(ids)
    bridge_labels = sbpet.causal_lm_bridge_labels(ids, mask)
    capture = None
    existing = [*model.parameters(), *model.buffers()]
    if regularised:
        with torch.device(config.device):
            embeddings = base.get_input_embeddings().weight
            reg = sbpet.BridgeRegularizer(config.hidden, config.layers, dims=DIMS, bridge="ou",
                                          word_embeddings=embeddings if config.device != "meta" else None,
                                          tail=torch.empty(config.vocab, DIMS[-1]) if config.device == "meta" else None,
                                          shift_labels=True, backend=config.backend)
        reg.to(config.device)
        reg.requires_grad_(False)  # frozen during PET training, as BridgeTrainer freezes it
        reg.eval()
        capture = sbpet.BridgeCapture(model, reg)
        existing += [*reg.parameters(), *reg.buffers()]
    device_ids = ids.to(config.device)
    batch = {"input_ids": device_ids, "labels": device_ids, "bridge_labels": bridge_labels}
    # The model gets no mask (all real; transformers' mask helpers read it back on ``meta``).
    existing += [device_ids, ids, mask, bridge_labels]
    return model, capture, batch, existing


def step(model, capture, batch):
    """One forward + backward, as BridgeTrainer's ``training_step``."""
    if capture is None:
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
        out.loss.backward()
        return
    with capture.armed(batch["bridge_labels"]):
        out = model(input_ids=batch["input_ids"], labels=batch["labels"])
    (out.loss + BRIDGE_WEIGHT * capture.loss()).backward()


def count_step(config: MemoryConfig, regularised: bool) -> int:
    """Peak bytes of one counted step (after one warm-up step) of ``config``, in this process."""
    model, capture, batch, existing = build(config, regularised)
    trainable = [p for p in model.parameters() if p.requires_grad]
    step(model, capture, batch)
    for p in trainable:
        p.grad = None
    tracker = StepTracker(existing)
    with tracker:
        step(model, capture, batch)
    return tracker.peak


def _child(config_name: str, regularised: bool, overrides: dict) -> int:
    config = replace(CONFIGS[config_name], **overrides)
    torch.set_num_threads(int(os.environ.get("SBPET_BENCH_THREADS", "1")))
    return count_step(config, regularised)


def run_config(config_name: str, overrides: dict | None = None) -> dict:
    """Both variants of ``config_name``, each in a fresh process: a record with the two peaks."""
    overrides = overrides or {}
    config = replace(CONFIGS[config_name], **overrides)
    peaks = {}
    for regularised in (False, True):
        cmd = [sys.executable, "-m", "benchmarks.memory", "--child", config_name, "--regularised",
               str(int(regularised)), "--overrides", json.dumps(overrides)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"{config_name} (regularised={regularised}) failed:\n{done.stderr[-3000:]}")
        peaks[regularised] = int(done.stdout.strip().splitlines()[-1])
    return {**asdict(config), "peak_without": peaks[False], "peak_with": peaks[True],
            "ratio": peaks[True] / peaks[False]}


def time_recompute(config_name: str, rounds: int = 7) -> dict:
    """Step times without the regulariser, with it and the recompute, and with it and g's
    activations saved (``SBPET_TORCH_RECOMPUTE=0``), interleaved round by round in this process
    (the order rotates; the backend is looked up at every step): medians and their ratios.
    ``SBPET_BENCH_THREADS`` threads (default 1: a shared machine's OpenMP barriers punish the
    recompute's smaller products more than one large one)."""
    import time

    torch.set_num_threads(int(os.environ.get("SBPET_BENCH_THREADS", "1")))
    config = CONFIGS[config_name]
    model, capture, batch, _ = build(config, True)
    modes = ("none", "save", "recompute")
    times = {mode: [] for mode in modes}
    for r in range(rounds + 1):
        for mode in modes[r % 3:] + modes[: r % 3]:
            os.environ[RECOMPUTE_ENV] = "0" if mode == "save" else "1"
            start = time.perf_counter()
            step(model, None if mode == "none" else capture, batch)
            if r:  # the first round warms up
                times[mode].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    os.environ.pop(RECOMPUTE_ENV, None)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {"config": config_name, "rounds": rounds, "threads": torch.get_num_threads(), "none_s": med["none"],
            "save_s": med["save"], "recompute_s": med["recompute"], "ratio": med["recompute"] / med["save"],
            "regulariser_cost_save": med["save"] / med["none"] - 1,
            "regulariser_cost_recompute": med["recompute"] / med["none"] - 1}


def render(records: list[dict]) -> str:
    lines = ["| config | H | layers | S | checkpointing | backend | count | peak without MiB | peak with MiB | ratio |",
             "| --- | ---: | ---: | ---: | --- | --- | --- | ---: | ---: | ---: |"]
    for r in records:
        lines.append(
            f"| {r['name']} | {r['hidden']} | {r['layers']} | {r['seq']} | {'on' if r['checkpointing'] else 'off'} | "
            f"{r['backend']} | {'meta' if r['device'] == 'meta' else 'cpu'} | {r['peak_without'] / 2**20:.1f} | "
            f"{r['peak_with'] / 2**20:.1f} | x{r['ratio']:.3f} |")
    return "\n".join(lines)


def render_markdown(result: dict) -> str:
    """The committed table: command, versions, the records and the timing."""
    env = result["environment"]
    lines = [f"# Peak tensor memory of one training step, with / without the regulariser ({env['date']})", "",
             f"`{result['command']}`", "",
             f"{env['device']}, {env.get('cpus')} CPUs, {env['threads']} thread(s); Python {env['python']}, "
             f"torch {env['torch']}, triton {env['triton']}, sbpet {env['sbpet']}; {env['platform']}", "",
             "Llama causal LM (random weights), LoRA r 8 on q_proj/v_proj, batch 1, every token regularised, "
             "g (1024, 256, 128) frozen, hooks route (BridgeCapture); peak of the storages created during the "
             "step (TorchDispatchMode count; `meta`: the same count with no data); one process per cell.", "",
             render(result["records"])]
    if result.get("timing"):
        lines += ["", render_timing(result["timing"])]
    return "\n".join(lines)


def render_timing(t: dict) -> str:
    return (f"Step time ({t['config']}, torch backend, {t['threads']} thread(s), medians of {t['rounds']} interleaved "
            f"rounds): without R {t['none_s']:.3f} s; with R, g's activations saved (SBPET_TORCH_RECOMPUTE=0) "
            f"{t['save_s']:.3f} s ({100 * t['regulariser_cost_save']:+.0f}%); with R and the recompute "
            f"{t['recompute_s']:.3f} s ({100 * t['regulariser_cost_recompute']:+.0f}%). Recompute / saved: "
            f"x{t['ratio']:.3f}.")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", default=",".join(DEFAULT_CONFIGS), help=f"comma list of {sorted(CONFIGS)}")
    parser.add_argument("--backend", default=None, help="the regulariser's backend (default: torch)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--md", default=None)
    parser.add_argument("--time", default=None, help="a config to time the recompute on (e.g. h1024-ckpt)")
    parser.add_argument("--check-meta", action="store_true", help="also count small-ckpt on cpu and on meta")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--regularised", default="0", help=argparse.SUPPRESS)
    parser.add_argument("--overrides", default="{}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(_child(args.child, args.regularised == "1", json.loads(args.overrides)))
        return 0
    overrides = {"backend": args.backend} if args.backend else {}
    names = [n for n in args.configs.split(",") if n]
    if args.check_meta:
        names += ["small-ckpt", "small-meta-ckpt", "small-nockpt", "small-meta-nockpt"]
    records = []
    for name in names:
        records.append(run_config(name, overrides))
        print(render(records[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(render(records))
    timing = None
    if args.time:
        timing = time_recompute(args.time)
        print("\n" + render_timing(timing))
    from benchmarks.measure import environment

    env = environment("cpu")
    result = {"environment": env, "command": " ".join(["python -m benchmarks.memory", *(argv or sys.argv[1:])]),
              "records": records, "timing": timing}
    for path, text in ((args.json, json.dumps(result, indent=1)), (args.md, render_markdown(result))):
        if path:
            tmp = f"{path}.tmp"
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
