"""The study's outputs: summaries per cell (alpha chosen on validation, the paired difference to
the vanilla PET with its interval, sign test and detectable effect), table.md, the dose-response
plot and g's fitting curves."""

from __future__ import annotations

import csv
import json
import math
import os

from ...core.files import atomic_write, write_text
from .stats import mean_std, paired_summary

__all__ = ["summarize", "format_table", "write_outputs", "cells"]

CELL = ("protocol", "pet", "shots", "regularizer", "fit_steps", "positions")


def _get(record: dict, name: str):
    # Records of studies made before the protocol, budget and positions axes lack them.
    return record.get(name, {"protocol": "ours"}.get(name))


def cells(records: list) -> list[tuple]:
    """The cells of the records (everything but alpha and seed), in the order first seen."""
    return list(dict.fromkeys(tuple(_get(r, k) for k in CELL) for r in records))


def summarize(records: list, grid: dict) -> tuple[list, list]:
    """The accuracy rows and the bridge-likeness rows, as lists of dicts.

    Accuracy rows, one per cell (protocol x PET x shots x regulariser x g budget x positions):
    alpha with the highest mean validation accuracy over seeds (ties: the smaller alpha), the
    mean validation and test accuracy there with their std over seeds, and the paired per-seed
    test-accuracy differences to the vanilla run of the same protocol, PET, shots and seed,
    summarised by :func:`~sbpet.cli.study.stats.paired_summary` (keys ``diff_*``).
    Bridge-likeness rows (vanilla runs, per protocol x PET x shots x bridge): mean R of the test
    paths under the true endpoints, under shuffled ones, and their ratio.
    """
    rows, analysis = [], []
    vanilla = {(_get(r, "protocol"), r["pet"], r["shots"], r["seed"]): r["test_accuracy"]
               for r in records if r["regularizer"] == "none"}
    for cell in cells(records):
        key = dict(zip(CELL, cell))
        mine = [r for r in records if tuple(_get(r, k) for k in CELL) == cell]
        by_alpha: dict = {}
        for r in mine:
            by_alpha.setdefault(r["alpha"], []).append(r)
        alpha = max(sorted(by_alpha, key=lambda x: -1 if x is None else x),
                    key=lambda x: mean_std(r["val_accuracy"] for r in by_alpha[x])[0])
        chosen = by_alpha[alpha]
        row = {**key, "alpha": alpha, "seeds": len(chosen)}
        row["val_mean"], row["val_std"] = mean_std(r["val_accuracy"] for r in chosen)
        row["test_mean"], row["test_std"] = mean_std(r["test_accuracy"] for r in chosen)
        steps = [r["chosen_step"] for r in chosen if r.get("chosen_step") is not None]
        if steps:
            row["chosen_step_mean"] = sum(steps) / len(steps)
            row["chosen_steps"] = sorted(steps)
        diffs = [r["test_accuracy"] - vanilla[k] for r in chosen
                 if (k := (key["protocol"], r["pet"], r["shots"], r["seed"])) in vanilla]
        if key["regularizer"] != "none" and diffs:
            row.update({f"diff_{k}": v for k, v in paired_summary(diffs).items()})
        rows.append(row)
        if key["regularizer"] == "none":
            bridges = sorted({b for r in chosen for b in (r.get("analysis") or {})})
            for bridge in bridges:
                found = [r["analysis"][bridge] for r in chosen if bridge in (r.get("analysis") or {})]
                true, _ = mean_std(a["true"] for a in found)
                shuffled, _ = mean_std(a["shuffled"] for a in found)
                analysis.append({**{k: key[k] for k in ("protocol", "pet", "shots")}, "bridge": bridge,
                                 "seeds": len(found), "true": true, "shuffled": shuffled, "ratio": true / shuffled})
    return rows, analysis


def _pm(mean: float, std: float, signed: bool = False) -> str:
    if math.isnan(mean):
        return ""
    text = f"{mean:+.3f}" if signed else f"{mean:.3f}"
    return text + ("" if math.isnan(std) else f" ± {std:.3f}")


def _diff(r: dict) -> list[str]:
    if "diff_mean" not in r:
        return ["", "", "", ""]
    interval = "" if math.isnan(r["diff_low"]) else f" [{r['diff_low']:+.3f}, {r['diff_high']:+.3f}]"
    detectable = "" if math.isnan(r["diff_detectable"]) else f"{r['diff_detectable']:.3f}"
    return [f"{r['diff_mean']:+.3f}{interval}", f"{r['diff_p']:.2f}",
            f"{r['diff_wins']}/{r['diff_ties']}/{r['diff_losses']}", detectable]


def _checkpoint_lines(rows: list) -> list[str]:
    """Which checkpoints the best-on-validation protocols kept, per cell (at the chosen alpha): a
    kept step far before the end marks a run whose test score rests on a noisy validation pick."""
    kept = [r for r in rows if r.get("chosen_steps")]
    if not kept:
        return []
    lines = ["", "**Checkpoints kept** (protocols that keep the best validation step; at the cell's alpha): the "
             "steps kept over the seeds, their median and every one, smallest first.", "",
             "| protocol | PET | shots | regulariser | g steps | positions | alpha | median step | steps kept |",
             "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | --- |"]
    for r in kept:
        steps = r["chosen_steps"]
        middle = len(steps) // 2
        median = steps[middle] if len(steps) % 2 else (steps[middle - 1] + steps[middle]) / 2
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        lines.append(f"| {r['protocol']} | {r['pet']} | {r['shots']} | {r['regularizer']} | "
                     f"{'' if r['fit_steps'] is None else r['fit_steps']} | {r['positions'] or ''} | {alpha} | "
                     f"{median:g} | {', '.join(map(str, steps))} |")
    return lines


def _g_lines(gs: list) -> list[str]:
    if not gs:
        return []
    lines = ["", "**g, per fitting budget.** R while fitting (first step; mean of the last 10% of steps) and, on the "
             "untuned PLM (LoRA at its zero init), R of the test [MASK] paths ending at the true label word's tail "
             "point vs at shuffled labels'. A ratio well below 1 means g separates the label words' endpoints; "
             "near 1 it carries little label information.", "",
             "| g | fitting steps | R, first step | R, end of fit | untuned R, true | untuned R, shuffled | ratio |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for g in gs:
        curve = g.get("curve") or []
        tail = curve[-max(1, len(curve) // 10):]
        fit = [f"{curve[0]:.4f}", f"{sum(tail) / len(tail):.4f}"] if curve else ["", ""]
        u = g.get("untuned")
        untuned = [f"{u['true']:.4f}", f"{u['shuffled']:.4f}", f"{u['ratio']:.3f}"] if u else ["", "", ""]
        lines.append(f"| {g['kind']}-{g['bridge']} | {g['fit_steps']} | " + " | ".join(fit + untuned) + " |")
    return lines


def format_table(rows: list, analysis: list, info: dict, gs: list = ()) -> str:
    """table.md: the settings, the accuracy table, g per budget and the bridge-likeness table."""
    seeds = max((r["seeds"] for r in rows), default=0)
    lines = ["# sbpet study", "", f"Reproduce: `{info['command']}`", "",
             f"Model `{info['model_dir']}`, data `{info['data_dir']}` ({len(info['classes'])} classes, "
             f"{info['test_examples']} test examples, one split for every seed); wall time of the runs "
             f"{info['run_seconds']:.0f} s on {'/'.join(map(str, info['threads']))} CPU thread(s).", "",
             f"**Test accuracy**, mean ± std over up to {seeds} seed{'' if seeds == 1 else 's'}. For each cell, "
             f"alpha is the one with the highest mean **validation** accuracy ({info['val_per_class']} examples "
             "per class per seed, drawn from the training pool, never the test split). Δ vs vanilla: the per-seed "
             "difference in test accuracy to the vanilla PET of the same protocol and seed (same few-shot sample, PET "
             "initialisation and data order), mean and 95% t interval; p: two-sided exact sign test; W/T/L: seeds "
             "where the regulariser wins / ties / loses; detectable: the smallest true mean difference this many "
             "seeds would find with 80% power at the 5% level, given the observed spread of the differences.", "",
             "| protocol | PET | shots | regulariser | g steps | positions | alpha | validation acc | test acc | "
             "Δ vs vanilla [95% CI] | p | W/T/L | detectable |",
             "| --- | --- | ---: | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        alpha = "" if r["alpha"] is None else f"{r['alpha']:g}"
        steps = "" if r["fit_steps"] is None else str(r["fit_steps"])
        lines.append(f"| {r['protocol']} | {r['pet']} | {r['shots']} | {r['regularizer']} | {steps} | "
                     f"{r['positions'] or ''} | {alpha} | {_pm(r['val_mean'], r['val_std'])} | "
                     f"{_pm(r['test_mean'], r['test_std'])} | " + " | ".join(_diff(r)) + " |")
    lines += _checkpoint_lines(rows)
    lines += _g_lines(list(gs))
    if analysis:
        lines += ["", "**Are vanilla PETs already bridge-like?** Bridge loss R (the PDF g of each bridge at the "
                  "longest budget) of the vanilla runs' test [MASK] paths ending at the true label word's tail point "
                  "vs at shuffled labels' (the labels permuted across the test examples with a fixed generator; with "
                  "C balanced classes about 1/C of them still match), mean over seeds. A ratio below 1: the paths "
                  "already end nearer their own label's endpoint, as the bridge would have them.", "",
                  "| protocol | PET | shots | bridge | R, true endpoint | R, shuffled endpoint "
                  "| ratio true / shuffled |",
                  "| --- | --- | ---: | --- | ---: | ---: | ---: |"]
        for r in analysis:
            lines.append(f"| {r['protocol']} | {r['pet']} | {r['shots']} | {r['bridge']} | {r['true']:.4f} | "
                         f"{r['shuffled']:.4f} | {r['ratio']:.3f} |")
    return "\n".join(lines) + "\n"


def plot_study(rows: list, path: str) -> str:
    """study.png, the dose-response: the paired test-accuracy difference to the vanilla PET (mean
    and 95% interval) against g's fitting budget, one panel per protocol x PET x shots, one line
    per regulariser and positions (alpha chosen on validation in each point)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regularised = [r for r in rows if "diff_mean" in r]
    panels = list(dict.fromkeys((r["protocol"], r["pet"], r["shots"]) for r in regularised)) or [("", "", "")]
    columns = min(3, len(panels))
    height = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(height, columns, figsize=(4.6 * columns, 3.6 * height), squeeze=False, sharey=True)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, panel in zip(axes.flat, panels):
        mine = [r for r in regularised if (r["protocol"], r["pet"], r["shots"]) == panel]
        lines = list(dict.fromkeys((r["regularizer"], r["positions"]) for r in mine))
        for k, line in enumerate(lines):
            points = sorted((r for r in mine if (r["regularizer"], r["positions"]) == line),
                            key=lambda r: r["fit_steps"])
            shift = 1 + 0.04 * (k - (len(lines) - 1) / 2)  # keeps the error bars of the lines apart
            xs = [r["fit_steps"] * shift for r in points]
            ys = [r["diff_mean"] for r in points]
            errors = [[0 if math.isnan(r["diff_low"]) else r["diff_mean"] - r["diff_low"] for r in points],
                      [0 if math.isnan(r["diff_high"]) else r["diff_high"] - r["diff_mean"] for r in points]]
            ax.errorbar(xs, ys, yerr=errors, marker="o", capsize=3, label=f"{line[0]}, {line[1]}")
        budgets = sorted({r["fit_steps"] for r in mine})
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("log")
        if budgets:
            ax.set_xticks(budgets, [str(b) for b in budgets])
            ax.set_xlim(min(budgets) / 1.6, max(budgets) * 1.6)
        ax.minorticks_off()
        ax.set_title(f"{panel[0]} protocol, {panel[1]}, {panel[2]} shots", fontsize=9)
        ax.set_xlabel("g fitting steps")
        ax.grid(alpha=0.3)
        if mine:
            ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("Δ test accuracy vs vanilla\n(mean, 95% interval over seeds)")
    fig.tight_layout()
    with atomic_write(path, "wb") as f:  # a reader never sees half a PNG
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def plot_fit_curves(gs: list, path: str) -> str | None:
    """fit_curves.png: R per fitting step of every g with a known curve (None: no curve known)."""
    known = [g for g in gs if g.get("curve")]
    if not known:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for g in known:
        curve = g["curve"]
        window = max(1, len(curve) // 50)  # a running mean: one step's R is noisy
        smooth = [sum(curve[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1))
                  for i in range(len(curve))]
        ax.plot(range(1, len(curve) + 1), smooth, label=f"{g['kind']}-{g['bridge']}, {g['fit_steps']} steps")
    ax.set_xscale("log")
    ax.set_xlabel("fitting step")
    ax.set_ylabel("R (running mean)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path, "wb") as f:  # a reader never sees half a PNG
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return path


def write_outputs(records: list, grid: dict, gs: list, out: str, info: dict) -> list[str]:
    """Write runs.json, runs.csv, table.md, study.png and (when a g's curve is known)
    fit_curves.png into ``out``; returns their paths."""
    os.makedirs(out, exist_ok=True)
    rows, analysis = summarize(records, grid)
    paths = [os.path.join(out, name) for name in ("runs.json", "runs.csv", "table.md", "study.png")]
    # Each output is written to a temporary file beside it and renamed into place (sbpet.core.files).
    with atomic_write(paths[0]) as f:
        json.dump({"study": info, "grid": grid, "g": gs, "runs": records, "table": rows, "analysis": analysis}, f,
                  indent=1)
    bridges = sorted({b for r in records for b in (r.get("analysis") or {})})
    columns = ["protocol", "pet", "regularizer", "fit_steps", "positions", "alpha", "shots", "seed", "val_accuracy",
               "test_accuracy", "task_loss", "bridge_loss", "train_loss", "chosen_step", "seconds", "threads", "cached",
               "config_hash"]
    columns += [f"R_{which}_{b}" for b in bridges for which in ("true", "shuffled")]
    with atomic_write(paths[1], newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for r in records:
            flat = {k: r.get(k) for k in columns}
            for b, values in (r.get("analysis") or {}).items():
                flat[f"R_true_{b}"], flat[f"R_shuffled_{b}"] = values["true"], values["shuffled"]
            writer.writerow(flat)
    write_text(paths[2], format_table(rows, analysis, info, gs))
    plot_study(rows, paths[3])
    curves = plot_fit_curves(gs, os.path.join(out, "fit_curves.png"))
    return paths + ([curves] if curves else [])
