"""The paper's figures from the collected runs (PNG and PDF, sized for a paper page).

- Fig. 3: training and validation loss against training tokens (and against training FLOPs, counting BTX's
  branch training), one curve per method, a band over seeds (min to max).
- Fig. 4: the same for the re-initialization ratio sweep.
- Fig. 5: for chosen layers, the share of each domain's tokens routed to each expert, methods side by side, with
  the uniform 1/E line. Figs. 6-8: the same for all layers, in early / middle / late thirds.
- `shared_curves` (beyond the paper): learning curves of NU and DU r = 0.5 with and without a shared expert;
  `granular_curves` and `balancing_curves` the same for the granular and load-balancing ablations;
  `similarity` the experts' mean pairwise weight similarity against tokens (beside Fig. 5's routing).
The paper's figures leave out methods the paper does not have (those with a shared expert).
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis.collect import split_label  # noqa: E402
from analysis.tables import BALANCING_ROWS, GRANULAR_ROWS, SHARED_ROWS, TABLE1_ROWS, method_order  # noqa: E402
from dropup.routing import shares  # noqa: E402

plt.rcParams.update({"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
                     "figure.dpi": 100, "axes.grid": True, "grid.alpha": 0.3})
METHOD_COLORS = {"Dense": "#555555", "FS": "#1f77b4", "BTX": "#9467bd", "NU": "#ff7f0e", "DU (r=0.5)": "#2ca02c",
                 "DU (r=1)": "#d62728", "NU + shared": "#ffbb78", "DU (r=0.5) + shared": "#98df8a",
                 "NU, G=4": "#8c564b", "NU, G=4 VG": "#e377c2", "DU (r=0.5), G=4 VG": "#17becf",
                 "NU, global-batch LB": "#bcbd22", "NU, aux-free": "#7f7f7f",
                 "DU (r=0.5), global-batch LB": "#1f77b4", "DU (r=0.5), aux-free": "#9467bd",
                 "NU, per-rank LB": "#d62728", "DU (r=0.5), per-rank LB": "#8c564b"}
DOMAIN_COLORS = {"ja": "#d62728", "en": "#1f77b4", "code": "#2ca02c"}


def _save(fig, out_dir: Path, name: str) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out_dir / f"{name}.{ext}"
        tmp = out_dir / f".{name}.tmp.{ext}"
        fig.savefig(tmp, dpi=200, bbox_inches="tight")
        tmp.replace(path)
        paths.append(path)
    plt.close(fig)
    return paths


def _ratio_color(label: str):
    ratio = method_order(label)[1]
    return plt.cm.viridis(0.1 + 0.8 * ratio) if label.startswith("DU") else METHOD_COLORS.get(label, "#888888")


def _band(ax, curves: pd.DataFrame, label: str, column: str, x: str, color, smooth: int = 1) -> bool:
    series = []
    for _, run in curves[curves["label"] == label].groupby("run_id"):
        rows = run.dropna(subset=[column]).sort_values(x)
        if rows.empty:
            continue
        values = rows[column].rolling(smooth, min_periods=1).mean() if smooth > 1 else rows[column]
        curve = pd.Series(values.to_numpy(), index=rows[x].to_numpy())
        series.append(curve[~curve.index.duplicated(keep="last")])  # older runs may repeat a row across a restart
    if not series:
        return False
    table = pd.concat(series, axis=1).sort_index().interpolate(limit_area="inside")
    mean = table.mean(axis=1)
    n = len(series)
    ax.plot(mean.index, mean.to_numpy(), color=color, lw=1.4, label=f"{label}" + (f" (n={n})" if n > 1 else ""))
    if n > 1:
        ax.fill_between(table.index, table.min(axis=1), table.max(axis=1), color=color, alpha=0.2, lw=0)
    return True


SCORE = "eval/avg"  # metrics.csv's downstream average (eval.in_training)


def learning_curves(runs: pd.DataFrame, curves: pd.DataFrame, labels: list[str], title: str, out_dir: Path,
                    name: str, colors=None) -> list[Path]:
    """Training loss and validation loss against tokens (top) and against training FLOPs (middle); where the runs
    were scored during training (`eval/avg` in metrics.csv), the downstream average against tokens and FLOPs as a
    bottom row, as the paper's Figs. 3 and 4 have."""
    colors = colors or {}
    curves = curves[curves["role"] == "run"].copy()
    flops_per_token = (runs.set_index("run_id")["train_flops"] / runs.set_index("run_id")["tokens"]).to_dict()
    extra = runs.set_index("run_id")["total_flops"] - runs.set_index("run_id")["train_flops"]
    curves["flops"] = curves["tokens"] * curves["run_id"].map(flops_per_token) + curves["run_id"].map(extra)
    present = [l for l in labels if (curves["label"] == l).any()]
    if not present:  # e.g. only a report's kept rows, whose run directories (and curves) are elsewhere
        print(f"[figures] {name}: no learning curves of {', '.join(labels)} under the run directories: not drawn")
        return []
    scored = SCORE in curves and curves[curves["label"].isin(present)][SCORE].notna().any()
    panels = [[("tokens", "training tokens", "train_loss", "training loss"),
               ("tokens", "training tokens", "val_loss", "validation loss (mean of domains)")],
              [("flops", "training FLOPs (incl. BTX branches)", "train_loss", "training loss"),
               ("flops", "training FLOPs (incl. BTX branches)", "val_loss", "validation loss (mean of domains)")]]
    if scored:
        panels.append([("tokens", "training tokens", SCORE, "downstream score (mean of tasks)"),
                       ("flops", "training FLOPs (incl. BTX branches)", SCORE, "downstream score (mean of tasks)")])
    fig, axes = plt.subplots(len(panels), 2, figsize=(7.0, 2.6 * len(panels)))
    for row, pair in enumerate(panels):
        for col, (x, xlabel, column, ylabel) in enumerate(pair):
            ax = axes[row, col]
            for l in present:
                _band(ax, curves, l, column, x, colors.get(l) or _ratio_color(l), smooth=5 if column == "train_loss" else 1)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            if column != SCORE:
                _zoom(ax, curves[curves["label"].isin(present)], column)
    handles, names = axes[0, 1].get_legend_handles_labels()
    fig.legend(handles, names, loc="upper center", ncol=min(len(names), 6), frameon=False, bbox_to_anchor=(0.5, 1.02))
    fig.suptitle(title, y=1.07)
    fig.tight_layout()
    return _save(fig, out_dir, name)


def _zoom(ax, curves: pd.DataFrame, column: str) -> None:
    """Show the part of training where the methods differ: skip the first steps' loss spike."""
    values = curves[column].dropna()
    if values.empty:
        return
    later = curves[curves["step"] > curves["step"].max() * 0.1][column].dropna()
    low, high = values.min(), (later.max() if not later.empty else values.max())
    ax.set_ylim(low - 0.05 * (high - low + 1e-9), high + 0.1 * (high - low + 1e-9))


def fig3(runs, curves, out_dir):
    labels = [l for l in TABLE1_ROWS if l != "Dense"]
    return learning_curves(runs, curves, labels, "Fig. 3: MoE initialization methods", out_dir, "fig3", METHOD_COLORS)


def paper_less(label) -> bool:
    """A method the paper does not have (a shared expert, fine-grained experts, another balancing mode), left out
    of its figures."""
    return bool(split_label(label)[1])


def shared_curves(runs, curves, out_dir):
    return learning_curves(runs, curves, list(SHARED_ROWS), "NU and DU r = 0.5, with and without a shared expert",
                           out_dir, "shared_curves", METHOD_COLORS)


def granular_curves(runs, curves, out_dir):
    return learning_curves(runs, curves, list(GRANULAR_ROWS), "Granular upcycling (G = 4), with and without "
                           "virtual groups", out_dir, "granular_curves", METHOD_COLORS)


def balancing_curves(runs, curves, out_dir):
    return learning_curves(runs, curves, list(BALANCING_ROWS), "Load balancing: pooled, global-batch, "
                           "auxiliary-loss-free", out_dir, "balancing_curves", METHOD_COLORS)


def similarity(runs, curves, out_dir):
    """Expert similarity (mean pairwise cosine of the experts' weights) against tokens, one line per method:
    the paper's thesis in one number -- re-initialization breaks the copies' symmetry, training drives them
    apart."""
    if curves.empty:
        return []
    rows = curves[(curves["role"] == "run")]
    if "expert_similarity" not in rows:
        rows = rows.assign(expert_similarity=float("nan"))
    rows = rows.dropna(subset=["expert_similarity"])
    if rows.empty:  # runs from before the metric: nothing to draw
        return []
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    for label in sorted(set(rows["label"]), key=method_order):
        color = METHOD_COLORS.get(label) or _ratio_color(label)
        style = "--" if "VG" in label or "G=" in label else (":" if paper_less(label) else "-")
        for i, (_, run) in enumerate(rows[rows["label"] == label].groupby("run_id")):
            run = run.sort_values("tokens")
            ax.plot(run["tokens"] / 1e6, run["expert_similarity"], color=color, ls=style, lw=1.3,
                    label=label if i == 0 else None)
    ax.set_xlabel("MoE training tokens (M)")
    ax.set_ylabel("expert similarity (mean pairwise cosine)")
    ax.set_ylim(-0.05, 1.05)
    if ax.lines:
        ax.legend(loc="best", frameon=False, fontsize=6)
    ax.set_title("How far training drives the experts apart")
    fig.tight_layout()
    return _save(fig, out_dir, "similarity")


def fig4(runs, curves, out_dir):
    labels = sorted({l for l in runs["label"] if (l == "NU" or str(l).startswith("DU")) and not paper_less(l)},
                    key=method_order)
    return learning_curves(runs, curves, labels, "Fig. 4: re-initialization ratio r (NU = r 0)", out_dir, "fig4")


def _routing(run_path: str) -> dict | None:
    path = Path(run_path) / "routing.json"
    return json.loads(path.read_text())["tokens_per_expert"] if path.is_file() else None


def routing_grid(runs: pd.DataFrame, layers: list[int] | None, out_dir: Path, name: str, title: str) -> list[Path]:
    """Rows: layers; columns: methods; bars: share of each domain's tokens sent to each expert."""
    done = runs[(runs["role"] == "run") & (runs["status"] == "completed") & (runs["moe"] != "none")]
    done = done[~done["label"].map(paper_less)]
    methods = []
    for label in sorted(set(done["label"]), key=method_order):
        first = done[done["label"] == label].sort_values("seed").iloc[0]
        counts = _routing(first["path"])
        if counts:
            methods.append((label, shares(counts)))
    if not methods:
        return []
    n_layers = next(iter(methods[0][1].values())).shape[0]
    layers = list(range(n_layers)) if layers is None else [l for l in layers if l < n_layers]
    n_experts = next(iter(methods[0][1].values())).shape[1]
    fig, axes = plt.subplots(len(layers), len(methods), figsize=(1.6 * len(methods) + 0.6, 1.25 * len(layers) + 0.7),
                             squeeze=False, sharey=True)
    width = 0.8 / len(methods[0][1])
    for j, (label, per_domain) in enumerate(methods):
        for i, layer in enumerate(layers):
            ax = axes[i, j]
            for k, (domain, share) in enumerate(per_domain.items()):
                ax.bar(np.arange(n_experts) + (k - (len(per_domain) - 1) / 2) * width, share[layer], width,
                       color=DOMAIN_COLORS.get(domain), label=domain)
            ax.axhline(1 / n_experts, color="black", ls="--", lw=0.8)
            ax.set_xticks(range(n_experts))
            ax.grid(False)
            if i == 0:
                ax.set_title(label)
            if j == 0:
                ax.set_ylabel(f"layer {layer}\nshare")
            if i == len(layers) - 1:
                ax.set_xlabel("expert")
    handles, names = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles + [plt.Line2D([], [], color="black", ls="--", lw=0.8)], names + ["1/E"], loc="upper center",
               ncol=len(names) + 1, frameon=False, bbox_to_anchor=(0.5, 1.0))
    fig.suptitle(title, y=1.04)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out_dir, name)


def fig5(runs, curves, out_dir):
    n_layers = int(runs["cfg.model.n_layers"].dropna().max()) if "cfg.model.n_layers" in runs else 1
    layers = sorted({0, n_layers // 2, n_layers - 1})
    return routing_grid(runs, layers, out_dir, "fig5", "Fig. 5: share of each domain's tokens routed to each expert")


def figs6to8(runs, curves, out_dir):
    n_layers = int(runs["cfg.model.n_layers"].dropna().max()) if "cfg.model.n_layers" in runs else 1
    paths = []
    for number, part, group in zip((6, 7, 8), ("early", "middle", "late"), np.array_split(range(n_layers), 3)):
        if len(group):
            paths += routing_grid(runs, list(map(int, group)), out_dir, f"fig{number}",
                                  f"Fig. {number}: routing in the {part} layers")
    return paths


def seed_gap(runs, curves, out_dir, reference: str = "NU"):
    """Each method's validation loss minus the reference's on the same seed, against tokens: the long-run trend.

    A line is the mean over seeds, the band their min to max; below zero is better than the reference.
    """
    val = curves[(curves["role"] == "run")].dropna(subset=["val_loss"])
    # a seed pairs runs within one version of the data streams only
    keys = ["seed", "data_stream_version", "step"] if "data_stream_version" in val else ["seed", "step"]
    ref = val[val["label"] == reference].set_index(keys)["val_loss"]
    labels = sorted({l for l in val["label"] if l not in (reference, "Dense")}, key=method_order)
    if ref.empty or not labels:
        print(f"[figures] seed_gap: no validation curves of {reference} and another method under the run "
              "directories: not drawn")
        return []
    # FS sits far above the upcycled methods: a panel of its own, when it was run with the same seeds
    subsets = [[l for l in labels if l != "FS"]] + ([["FS"]] if "FS" in labels else [])
    fig, axes = plt.subplots(1, len(subsets), figsize=(3.5 * len(subsets), 2.8), squeeze=False)
    axes = axes[0]
    for ax, subset in zip(axes, subsets):
        for label in subset:
            gap = val[val["label"] == label].set_index(keys)["val_loss"] - ref
            gap = gap.dropna().reset_index()
            if gap.empty:
                continue
            gap["tokens"] = gap["step"] * float(runs["tokens"].max() / runs["steps"].max())
            table = gap.pivot(index="tokens", columns="seed", values="val_loss")
            color = METHOD_COLORS.get(label) or _ratio_color(label)
            ax.plot(table.index / 1e6, table.mean(axis=1), color=color, lw=1.4, label=f"{label} (n={table.shape[1]})")
            if table.shape[1] > 1:
                ax.fill_between(table.index / 1e6, table.min(axis=1), table.max(axis=1), color=color, alpha=0.2, lw=0)
        ax.axhline(0.0, color=METHOD_COLORS.get(reference, "k"), lw=0.8, ls="--")
        ax.set_xlabel("MoE training tokens (M)")
        ax.set_ylabel(f"val loss − {reference} (same seed)")
        if ax.lines[:-1]:
            ax.legend(loc="best", frameon=False)
    if len(axes[0].lines) > 1:  # skip the steep first validations so the late gaps are readable
        later = axes[0].lines[0].get_xdata()
        axes[0].set_xlim(later.max() * 0.1, later.max() * 1.01)
        ys = np.concatenate([l.get_ydata()[l.get_xdata() >= later.max() * 0.1] for l in axes[0].lines[:-1]])
        if ys.size:
            axes[0].set_ylim(min(ys.min(), 0) - 0.005, max(ys.max(), 0) + 0.005)
    fig.suptitle(f"Validation loss relative to {reference}, paired by seed (mean, min–max band)", y=1.02)
    fig.tight_layout()
    return _save(fig, out_dir, "seed_gap")


FIGURES = {"fig3": fig3, "fig4": fig4, "fig5": fig5, "figs6to8": figs6to8, "seed_gap": seed_gap,
           "shared_curves": shared_curves, "granular_curves": granular_curves, "balancing_curves": balancing_curves,
           "similarity": similarity}


def render(names, runs: pd.DataFrame, curves: pd.DataFrame, out_dir: Path) -> list[Path]:
    return [p for name in names for p in FIGURES[name](runs, curves, Path(out_dir))]
