"""Turn benchmark JSON into a markdown table.

    python -m benchmarks.report RESULTS.json [-o TABLE.md]

RESULTS.json is either pytest-benchmark's ``--benchmark-json`` output of benchmarks/bench_bridge.py
(the suite's record is in each benchmark's ``extra_info``) or the JSON written by
``python -m benchmarks.gpu_check`` (records under ``results``). Per shape and pass, one row per
backend: median and minimum time, speed-up against the paper's data path (``paper``, what users
run without sbpet), against the eager reference and against torch.compile of the reference, peak
extra memory beyond the inputs (returned gradients included) and its ratio to the reference's,
% of the roofline floor. Targets are shown, never asserted. Training-step records
(benchmarks/train_step.py: its pytest JSON, or ``train_step`` in gpu_check's JSON) add a second
table: step time with and without the regulariser and its cost in % of the step.
"""

from __future__ import annotations

import argparse
import json
import sys

BACKEND_ORDER = ("paper", "reference", "compile", "torch", "triton")
PASS_ORDER = ("fwd", "fwd+bwd")
MIB = 1 << 20


def load_records(data: dict) -> tuple[list[dict], dict]:
    """(records, meta) from either JSON format; meta holds environment, ceilings and targets."""
    if "results" in data:
        meta = {k: data.get(k) for k in ("environment", "ceilings", "targets", "tests", "train_step")}
        return list(data["results"]), meta
    records, meta = [], {"environment": None, "ceilings": None, "targets": None, "train_step": None}
    for bench in data.get("benchmarks", []):
        info = dict(bench.get("extra_info") or {})
        if info.get("benchmark") == "train_step":  # benchmarks/bench_train_step.py
            meta["train_step"] = (meta["train_step"] or []) + list(info.get("records") or [])
            if info.get("environment") and not meta["environment"]:
                meta["environment"] = info["environment"]
            continue
        if "backend" not in info:
            continue
        for key in ("environment", "ceilings", "targets"):
            value = info.pop(key, None)
            if value and not meta[key]:
                meta[key] = value
        stats = bench.get("stats") or {}
        info.setdefault("median_s", stats.get("median"))
        info.setdefault("min_s", stats.get("min"))
        info.setdefault("status", "ok")
        records.append(info)
    if not meta["environment"] and data.get("machine_info"):
        mi = data["machine_info"]
        meta["environment"] = {"device": (mi.get("cpu") or {}).get("brand_raw", mi.get("machine")),
                               "python": mi.get("python_version"), "date": data.get("datetime", "")[:10]}
    return records, meta


def _fmt_time(seconds):
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def _fmt_ratio(value, digits=2):
    return "-" if value is None else f"{value:.{digits}f}x"


def _target(targets, key, shape):
    table = (targets or {}).get(key)
    if isinstance(table, dict):
        return table.get(shape, table.get("default"))
    return table


def render(records: list[dict], meta: dict) -> str:
    env = meta.get("environment") or {}
    ceilings = meta.get("ceilings") or {}
    targets = meta.get("targets") or {}
    title = "sbpet bridge loss" if records else "sbpet training step"
    lines = [f"### {title}: {env.get('device', '?')}, {env.get('date', '?')}", ""]
    versions = ", ".join(f"{k} {env[k]}" for k in ("torch", "triton", "python", "cuda", "driver") if env.get(k))
    if env.get("threads"):
        versions += f", {env['threads']} CPU thread(s)"
    lines.append((versions or "versions not recorded") + ".  ")
    if ceilings:
        lines.append(
            f"Ceilings measured in the run: copy {ceilings['copy_bytes_per_s'] / 1e9:.1f} GB/s "
            f"(read + write), matmul {ceilings['matmul_flops_per_s'] / 1e12:.3g} TFLOP/s "
            f"({ceilings.get('matmul_shape', '')})")
    lines.append("")
    if records:
        lines.append("| shape | pass | backend | median ms | min ms | vs paper | vs eager | vs compile "
                     "| peak extra MiB | mem vs eager | % of floor | check |")
        lines.append("| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    groups: dict = {}
    for r in records:
        groups.setdefault((r["shape"], r["pass"]), {})[r["backend"]] = r
    shape_order = list(dict.fromkeys(r["shape"] for r in records))
    skipped = []
    summary = []
    for shape in shape_order:
        for pass_ in PASS_ORDER:
            group = groups.get((shape, pass_))
            if not group:
                continue
            ref, comp, paper = group.get("reference"), group.get("compile"), group.get("paper")

            def median(r):
                return r.get("median_s") if r and r.get("status", "ok") == "ok" else None

            for backend in BACKEND_ORDER + tuple(b for b in group if b not in BACKEND_ORDER):
                r = group.get(backend)
                if r is None:
                    continue
                if r.get("status", "ok") != "ok":
                    skipped.append(f"- {shape} {pass_} {backend}: {r.get('status')}: {r.get('reason')}")
                    continue
                m = median(r)
                vs_eager = median(ref) / m if m and median(ref) else None
                vs_compile = median(comp) / m if m and median(comp) else None
                vs_paper = median(paper) / m if m and median(paper) else None
                temp = r.get("peak_bytes")
                ref_temp = ref.get("peak_bytes") if ref and ref.get("status", "ok") == "ok" else None
                mem_ratio = temp / ref_temp if temp is not None and ref_temp else None
                frac = r.get("floor_s") / m if m and r.get("floor_s") else None
                err = r.get("check_error")
                check = "-" if err is None else f"{err:.1e} vs {r.get('checked_against', 'reference')}"
                if backend == "reference" and err is not None and r.get("checked_against") == "reference":
                    check = "(yardstick)"
                lines.append(
                    f"| {shape} | {pass_} | {backend} | {_fmt_time(m)} | {_fmt_time(r.get('min_s'))} | "
                    f"{_fmt_ratio(vs_paper)} | {_fmt_ratio(vs_eager)} | {_fmt_ratio(vs_compile)} | "
                    f"{'n/a' if temp is None else f'{temp / MIB:.1f}'} | {_fmt_ratio(mem_ratio, 3)} | "
                    f"{'-' if frac is None else f'{100 * frac:.1f}%'} | {check} |")
                if pass_ == "fwd+bwd":
                    summary.extend(_targets_met(targets, shape, backend, r, vs_eager, vs_compile, mem_ratio, frac,
                                                vs_paper))
                    if backend == "triton@bf16":  # issue 11: against torch at the same precision
                        torch_same = median(group.get("torch@bf16"))
                        summary.extend(_kernel_targets(targets, shape, vs_paper,
                                                       torch_same / m if m and torch_same else None, frac))
    if summary:
        lines += ["", "Targets (fwd+bwd; shown, never asserted):", ""] + summary
    if skipped:
        lines += ["", "Not measured:", ""] + skipped
    if meta.get("train_step"):
        lines += ([""] if records else []) + [render_train_steps(meta["train_step"])]
    if meta.get("tests"):
        t = meta["tests"]
        lines += ["", f"Test suite on this device: {t.get('summary', t)}"]
    lines.append("")
    return "\n".join(lines)


def _mark(value, target, higher=True):
    if value is None or target is None:
        return "not measured"
    ok = value >= target if higher else value <= target
    return "met" if ok else "missed"


def _kernel_targets(targets, shape, vs_paper, vs_torch, frac) -> list[str]:
    """Issue 11's targets for ``triton@bf16`` (bf16 states, g's products at precision bf16)."""
    table = (targets or {}).get("kernel2_bf16") or {}
    parts = []
    for label, key, value in (("vs paper", "vs_paper", vs_paper), ("vs torch@bf16", "vs_torch", vs_torch)):
        target = (table.get(key) or {}).get(shape)
        if target is not None:
            parts.append(f"{label} >= {target}x: {_fmt_ratio(value)} ({_mark(value, target)})")
    if table.get("floor_fraction") is not None:
        tf = table["floor_fraction"]
        parts.append(f">= {tf:.0%} of floor: {'-' if frac is None else f'{frac:.0%}'} ({_mark(frac, tf)})")
    return [f"- {shape}: triton@bf16 " + "; ".join(parts)] if parts else []


def _targets_met(targets, shape, backend, r, vs_eager, vs_compile, mem_ratio, frac, vs_paper=None):
    mark = _mark

    out = []
    if backend == "torch":
        cpu = [(f"torch vs {name}", key, value) for name, key, value in
               (("paper", "cpu_torch_vs_paper", vs_paper), ("eager", "cpu_torch_vs_eager", vs_eager))
               if shape in (targets.get(key) or {})]
        if cpu:
            out.append(f"- {shape}: " + "; ".join(
                f"{what} >= {targets[key][shape]}x: {_fmt_ratio(value)} ({mark(value, targets[key][shape])})"
                for what, key, value in cpu))
    if backend == "triton" and r.get("device") == "cuda":
        te, tc = _target(targets, "speedup_vs_eager", shape), _target(targets, "speedup_vs_compile", shape)
        tm, tf = targets.get("memory_vs_eager"), targets.get("floor_fraction")
        out.append(
            f"- {shape}: triton vs eager >= {te}x: {_fmt_ratio(vs_eager)} ({mark(vs_eager, te)}); "
            f"vs compile >= {tc}x: {_fmt_ratio(vs_compile)} ({mark(vs_compile, tc)}); "
            f"peak extra memory <= {tm:.0%} of eager's: {_fmt_ratio(mem_ratio, 3)} ({mark(mem_ratio, tm, higher=False)}); "
            f">= {tf:.0%} of floor: {'-' if frac is None else f'{frac:.0%}'} ({mark(frac, tf)})")
    return out


def render_train_steps(records: list[dict]) -> str:
    """Markdown table of training-step records (benchmarks/train_step.py), targets and what was not measured."""
    lines = ["#### Training step: one BridgeTrainer step, LoRA on the attention projections",
             "",
             "| config | model | batch x seq | N | autocast | variant | capture, g | median ms | min ms "
             "| regulariser cost | paired | syncs/step | peak GiB | step peak GiB | step memory | check |",
             "| --- | --- | --- | ---: | --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: "
             "| --- |"]
    skipped, targets = [], []
    for r in records:
        if r.get("status") != "ok":
            mark = ", compiled" if r.get("compiled") else ""
            skipped.append(f"- {r['config']} {r['variant']}{mark}: {r.get('status')}: {r.get('reason')}")
            continue
        model = f"{r.get('arch', '?')} L{r.get('layers')} H{r.get('hidden')}"
        cost = f"{100 * r['overhead']:+.1f}%" if r.get("overhead") is not None else "-"
        paired = f"{100 * r['overhead_paired']:+.1f}%" if r.get("overhead_paired") is not None else "-"
        peak = f"{r['peak_bytes'] / 2**30:.2f}" if r.get("peak_bytes") else "-"
        step_peak = f"{r['step_peak_bytes'] / 2**30:.3f}" if r.get("step_peak_bytes") is not None else "-"
        memory = f"x{r['step_memory_ratio']:.3f}" if r.get("step_memory_ratio") is not None else "-"
        syncs = "-" if r.get("syncs_per_step") is None else str(r["syncs_per_step"])
        chosen = r.get("auto_choice") or r.get("resolved_backend")
        variant = r["variant"] + (f" ({chosen})" if r["variant"] == "auto" and chosen else "")
        variant += ", compiled" if r.get("compiled") else ""
        autocast = "bf16" if r.get("mixed_precision") == "bf16" else "-"
        capture = f"{r['capture']}, {r.get('g_precision', 'fp32')}" if r.get("capture") else "-"
        check = "-" if r.get("check_error") is None else f"{r['check_error']:.1e} vs {r.get('checked_against')}"
        if r["variant"] == "none":
            check = f"loss {r.get('loss', float('nan')):.4g}"
        lines.append(f"| {r['config']} | {model} | {r.get('batch')}x{r.get('seq')} | {r.get('num_positions', '-')} | "
                     f"{autocast} | {variant} | {capture} | {_fmt_time(r.get('median_s'))} | "
                     f"{_fmt_time(r.get('min_s'))} | {cost} | {paired} | {syncs} | {peak} | {step_peak} | {memory} | "
                     f"{check} |")
        if r.get("target") is not None and r["variant"] != "none" and r.get("overhead") is not None:
            met = "met" if r["overhead"] <= r["target"] else "missed"
            targets.append(f"- {r['config']} {r['variant']}: regulariser <= {r['target']:.0%} of the step: "
                           f"{100 * r['overhead']:+.1f}% ({met})")
    lines += ["", "Regulariser cost = (step with R - step without R) / step without R, from the medians; "
              "paired: the median over rounds of the same ratio within a round. Syncs/step: host synchronisations "
              "in one warm step (torch.cuda.set_sync_debug_mode warnings, the Trainer's own included: compare with "
              "none; CUDA only). Peak: torch.cuda.max_memory_allocated over one step (weights and optimizer "
              "included); step peak: that peak less what was allocated before the step; step memory: the step "
              "peak over the step's without the regulariser (issue 35: <= x1.15 with every token regularised; "
              "CUDA only, the CPU count is python -m benchmarks.memory)."]
    if targets:
        lines += ["", "Targets (shown, never asserted):", ""] + targets
    if skipped:
        lines += ["", "Not measured:", ""] + skipped
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", help="pytest-benchmark JSON or gpu_check JSON")
    parser.add_argument("-o", "--output", help="also write the table to this file")
    args = parser.parse_args(argv)
    with open(args.results, encoding="utf-8") as f:
        data = json.load(f)
    records, meta = load_records(data)
    if not records and not meta.get("train_step"):
        print(f"{args.results}: no sbpet benchmark records found", file=sys.stderr)
        return 1
    table = render(records, meta)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
