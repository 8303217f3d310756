"""The paper's analysis plot: the regularised token's latent path across the layers against the
bridge's mean and one-standard-deviation band (matplotlib, Agg backend)."""

from __future__ import annotations

import os

import torch

__all__ = ["latent_paths", "plot_runs"]


@torch.no_grad()
def latent_paths(classifier, regularizer, input_ids, attention_mask, labels, label_word_ids, mask_token_id):
    """Latent points of each sequence's [MASK] token at every layer and their split against the
    bridge towards its label word's tail point e (unit norm).

    Returns ``(along [L+1, B], across [L+1, B])``: ``along`` = z . e (the bridge mean there is
    ``mean_coef_l``), ``across`` = ||z - (z . e) e|| / sqrt(D - 1), the per-dimension spread off the
    bridge's line (one bridge standard deviation is ``sqrt(var_l)``).
    """
    classifier.eval()
    states = classifier.encoder(input_ids=input_ids, attention_mask=attention_mask,
                                output_hidden_states=True).hidden_states
    shift = states[0].shape[1] - input_ids.shape[1]
    mask = attention_mask.float()
    if shift:
        mask = torch.cat([mask.new_ones(mask.shape[0], shift), mask], 1)
    weights = mask / mask.sum(1, keepdim=True)
    batch, position = (input_ids == mask_token_id).nonzero(as_tuple=True)
    mapping = regularizer.mapping
    along, across = [], []
    ends = regularizer.tail[torch.as_tensor(label_word_ids, device=labels.device)[labels]].float()
    ends = ends / ends.norm(dim=1, keepdim=True)
    for h in states:
        h = h.float()
        context = torch.einsum("bs,bsh->bh", weights, h)[batch]
        z = mapping(torch.cat([context, h[batch, position + shift]], -1).to(mapping.layers[0].weight.dtype)).float()
        a = (z * ends).sum(-1)
        along.append(a)
        across.append((z - a[:, None] * ends).norm(dim=-1) / max(1, z.shape[-1] - 1) ** 0.5)
    return torch.stack(along).cpu(), torch.stack(across).cpu()


def plot_runs(setup, runs, out: str, examples: int = 40, untuned: bool = False) -> str:
    """Draw one column per run (``sbpet train`` folders), first the untuned PLM with a fresh LoRA
    when ``untuned``, with the [MASK] token's latent paths on test examples against the bridge.
    Returns ``out``; ValueError when there is nothing to draw (no run and not ``untuned``: an
    untuned PLM is never drawn in place of runs that are missing)."""
    import matplotlib

    matplotlib.use("Agg")
    import json

    import matplotlib.pyplot as plt

    from ..core.bridges import layer_times
    from .demo import load_run
    from .protocol import OURS, Protocol
    from ..modules.regularizer import BridgeRegularizer

    columns = ([None] if untuned else []) + list(runs or [])
    if not columns:
        raise ValueError("no run to plot (pass untuned=True to draw the untuned PLM)")
    default_bridge = getattr(setup.args, "bridge", None) or "brownian"
    entries = []
    for run in columns:
        if run is None:
            meta = {"pet": "lora", "bridge": "untuned", "g_dir": None}
        else:
            with open(os.path.join(run, "run.json")) as f:
                meta = json.load(f)
        protocol = Protocol(**meta["protocol"]) if meta.get("protocol") else OURS  # virtual tokens, ...
        classifier, encoder, words = setup.build_classifier(meta["pet"], setup.args.seed, protocol)
        if run is not None:
            load_run(run, classifier)
        g_dir = meta.get("g_dir")
        if g_dir and os.path.isfile(os.path.join(g_dir, "sbpet_config.json")):
            reg = BridgeRegularizer.from_pretrained(g_dir, model=encoder).to(setup.device)
        else:
            # The untuned PLM, or a run whose g is no longer cached: the g of these settings and
            # the run's own bridge (fitted now on the untuned PLM when not cached).
            bridge = meta["bridge"] if meta["bridge"] in ("brownian", "ou") else default_bridge
            reg = setup.regularizer(bridge)
        if reg.config.get("kind", "pdf") != "pdf":  # an SDE run: latent paths are the PDF g's
            reg = setup.regularizer(reg.bridge.name)
        test_rows = setup.split(meta.get("test_per_class"))[1]
        ids, mask, y = setup.encode(test_rows)
        pick = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))[:examples]
        along, across = latent_paths(classifier, reg, ids[pick].to(setup.device), mask[pick].to(setup.device),
                                     y[pick].to(setup.device), words, setup.tokenizer.mask_token_id)
        name = "vanilla PET" if meta["bridge"] == "none" else (
            "untuned PLM" if meta["bridge"] == "untuned" else f"{meta['bridge']} bridge, alpha={meta.get('alpha')}")
        accuracy = meta.get("metrics", {}).get("accuracy")
        title = f"{meta['pet']}: {name}" + (f"\ntest accuracy {accuracy:.3f}" if accuracy is not None else "")
        entries.append((title, reg, along, across))

    fig, axes = plt.subplots(2, len(entries), figsize=(5 * len(entries), 7.5), squeeze=False, sharey="row")
    for col, (title, reg, along, across) in enumerate(entries):
        num_states = along.shape[0]
        times = layer_times(num_states).float()
        mean_coef, variance = (m.float() for m in reg.bridge.marginals(num_states))
        std = variance.sqrt()
        grid = torch.linspace(0, 1, 101)
        grid_mean = reg.bridge.mean_coef(grid.double()).float()
        grid_std = reg.bridge.variance(grid.double()).float().clamp_min(0).sqrt()
        top, bottom = axes[0, col], axes[1, col]
        top.fill_between(grid, grid_mean - grid_std, grid_mean + grid_std, color="tab:orange", alpha=0.25,
                         label="bridge mean ± 1 sd")
        top.plot(grid, grid_mean, color="tab:orange", lw=2)
        for i in range(along.shape[1]):
            top.plot(times, along[:, i], color="tab:blue", alpha=0.35, lw=1, marker=".")
        top.plot([], [], color="tab:blue", label="[MASK] latent paths")
        top.set_title(title)
        top.set_ylabel("z · e (towards the label word's tail)")
        top.legend(loc="upper left", fontsize=8)
        bottom.fill_between(times, 0 * std, std, color="tab:orange", alpha=0.25, label="bridge sd per dimension")
        for i in range(across.shape[1]):
            bottom.plot(times, across[:, i], color="tab:green", alpha=0.35, lw=1, marker=".")
        bottom.plot([], [], color="tab:green", label="off-bridge spread per dimension")
        bottom.set_xlabel("layer time t_l = (l+1)/(L+2)")
        bottom.set_ylabel("|z - (z·e) e| / sqrt(D-1)")
        bottom.set_yscale("log")
        bottom.legend(loc="upper left", fontsize=8)
        for ax in (top, bottom):
            ax.set_xlim(0, 1)
            ax.grid(alpha=0.3)
    fig.tight_layout()
    from ..core.files import atomic_write

    with atomic_write(out, "wb") as f:  # a reader never sees half a PNG
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return out
