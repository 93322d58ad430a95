"""Configs compared with the uncertainty they carry: the runs of one config over several seeds grouped, each config's
mean with a 95% interval over seeds and a bootstrap interval over test rows, and, for every config, whether it
differs from the best one at 95% (a paired bootstrap over the same test rows, pooled over seeds, with McNemar's
exact test beside it). The best config is chosen on validation, never on test.
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.errors import RunFolderError
from budgetlora.experiments.stats import Interval, Paired, paired, row_interval, seed_interval

COST_FIELDS = ("train_samples_per_s", "train_tokens_per_s", "peak_rss_mb", "peak_gpu_mb", "adapter_bytes",
               "wall_time_s")


def read_answers(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source rows, gold, predicted) from a run's per-row answers (test_predictions.csv, val_predictions.csv),
    sorted by row. Missing or malformed: one RunFolderError naming the file."""
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
        if table.shape[1] != 3 or not len(table):
            raise ValueError
    except (ValueError, OSError):
        raise RunFolderError(f"{path} is missing or corrupt: expected rows of row,label,predicted integers") from None
    table = table[np.argsort(table[:, 0], kind="stable")]
    return table[:, 0], table[:, 1], table[:, 2]


def read_predictions(run: Path) -> tuple[np.ndarray, np.ndarray] | None:
    """(source rows, correct) from a run's test_predictions.csv, sorted by row; None when the run has none (runs
    made before it was written). A malformed file is one RunFolderError naming it."""
    path = Path(run) / runs.PREDICTIONS
    if not path.is_file():
        return None
    rows, gold, predicted = read_answers(path)
    return rows, gold == predicted


@dataclass
class Group:
    """The runs of one config, one per seed."""
    key: str
    rows: list[dict]  # leaderboard rows (collect()), one per seed
    val: Interval = None
    test: Interval = None
    test_rows: Interval | None = None  # bootstrap over rows, pooled over seeds
    n_rows: int = 0
    correct: np.ndarray | None = None  # (seeds, rows), rows in source order
    row_ids: np.ndarray | None = None
    vs_best: Paired | None = None
    cost: dict = field(default_factory=dict)

    @property
    def first(self) -> dict:
        return self.rows[0]

    @property
    def seeds(self) -> int:
        return len(self.rows)


def group_runs(rows: list[dict], folder: Path) -> list[Group]:
    """Group collect()'s rows by config (the run id with the seed left out), best validation mean first."""
    groups: dict[str, Group] = {}
    for r in rows:
        groups.setdefault(r["config_key"], Group(r["config_key"], [])).rows.append(r)
    for g in groups.values():
        g.rows.sort(key=lambda r: r["seed"])
        g.val = seed_interval([r["val_accuracy"] for r in g.rows])
        g.test = seed_interval([r["test_accuracy"] for r in g.rows])
        g.cost = {k: float(np.mean([r[k] for r in g.rows])) for k in COST_FIELDS
                  if all(r.get(k) is not None for r in g.rows)}
        _attach_predictions(g, folder)
    ordered = sorted(groups.values(), key=lambda g: (-g.val.mean, g.key))
    if ordered:
        _mark_against_best(ordered)
    return ordered


def _attach_predictions(g: Group, folder: Path) -> None:
    preds = [read_predictions(Path(folder) / r["path"]) for r in g.rows]
    if any(p is None for p in preds) or any(not np.array_equal(p[0], preds[0][0]) for p in preds):
        return  # a run without per-row answers, or seeds scored on different rows: no row-level interval
    g.row_ids, g.correct = preds[0][0], np.stack([p[1] for p in preds])
    g.n_rows = len(g.row_ids)
    g.test_rows = row_interval(g.correct)


def _mark_against_best(ordered: list[Group]) -> None:
    best = ordered[0]
    for g in ordered[1:]:
        if best.correct is not None and g.correct is not None and np.array_equal(best.row_ids, g.row_ids):
            g.vs_best = paired(g.correct, best.correct)


def verdict(g: Group, best: Group) -> str:
    if g is best:
        return "best (val)"
    if g.vs_best is None:
        return "n/a: not scored on the same rows"
    d = g.vs_best.difference
    if not g.vs_best.significant:
        return "same at 95%"
    return "worse at 95%" if d.high < 0 else "better on test at 95%"


def _pm(iv: Interval | None, digits: int = 4) -> str:
    return "" if iv is None else f"{iv.mean:.{digits}f} ± {iv.half_width:.{digits}f}"


def table_rows(groups: list[Group]) -> list[dict]:
    best = groups[0] if groups else None
    out = []
    for g in groups:
        f, d = g.first, g.vs_best
        out.append({
            "config": f["name"] or f["config_key"], "method": f["method"], "r": f["r"], "alpha": f["alpha"],
            "targets": f["targets"], "lr": f["lr"], "trainable_params": f["trainable_params"], "seeds": g.seeds,
            "test_rows": g.n_rows or "", "val_accuracy": _pm(g.val), "test_accuracy": _pm(g.test),
            "test_accuracy_rows_ci": "" if g.test_rows is None else f"[{g.test_rows.low:.4f}, {g.test_rows.high:.4f}]",
            "diff_vs_best": "" if d is None else f"{d.difference.mean:+.4f} [{d.difference.low:+.4f}, "
                                                 f"{d.difference.high:+.4f}]",
            "mcnemar_p": "" if d is None else f"{d.mcnemar_p:.3g}", "verdict": verdict(g, best),
            **{k: round(v, 1) for k, v in g.cost.items()},
        })
    return out


COLUMNS = ["config", "method", "r", "alpha", "targets", "lr", "trainable_params", "seeds", "test_rows",
           "val_accuracy", "test_accuracy", "test_accuracy_rows_ci", "diff_vs_best", "mcnemar_p", "verdict",
           *COST_FIELDS]


def to_markdown(groups: list[Group]) -> str:
    rows = table_rows(groups)
    cols = [c for c in COLUMNS if any(r.get(c) not in ("", None) for r in rows)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(_cell(r.get(c)) for c in cols) + " |")
    note = ("val/test accuracy: mean ± the 95% t-interval over seeds; test_accuracy_rows_ci: 95% bootstrap over "
            "test rows, pooled over seeds; diff_vs_best: paired bootstrap of the accuracy difference to the best "
            "config (by validation) on the same rows; mcnemar_p: exact McNemar test on the discordant answers.")
    return "\n".join(lines) + "\n\n" + note + "\n"


def best_per_method(groups: list[Group]) -> list[Group]:
    """Each method at its best setting, chosen on validation (groups come best first): with a learning-rate axis in
    the sweep, every method is compared at its own best rate rather than at one shared rate."""
    seen, out = set(), []
    for g in groups:
        if g.first["method"] not in seen:
            seen.add(g.first["method"])
            out.append(g)
    return out


def methods_markdown(groups: list[Group]) -> str:
    """The methods table: each method at its best configuration, with the learning rate it won at and how many
    configurations (rates, sizes) it was chosen from."""
    best = groups[0] if groups else None
    tried = {}
    for g in groups:
        tried[g.first["method"]] = tried.get(g.first["method"], 0) + 1
    lines = ["| method | won at lr | chosen from | trainable_params | seeds | val_accuracy | test_accuracy | verdict |",
             "|---|---|---|---|---|---|---|---|"]
    for g in best_per_method(groups):
        f = g.first
        lines.append(f"| {f['method']} | {f['lr']:g} | {tried[f['method']]} configs | {_cell(f['trainable_params'])} | "
                     f"{g.seeds} | {_pm(g.val)} | {_pm(g.test)} | {verdict(g, best)} |")
    return "\n".join(lines) + "\n"


def to_csv(groups: list[Group]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(table_rows(groups))
    return buf.getvalue()


def _cell(v) -> str:
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
        return f"{v:,}"
    return "" if v is None else str(v).replace("|", "\\|")


def interval_figure(groups: list[Group]) -> bytes:
    """Each config's test accuracy with its 95% intervals as error bars: over seeds (black) and over test rows
    (grey, where per-row answers exist), best validation config first."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 0.45 * max(len(groups), 3) + 1.2))
    y = np.arange(len(groups))[::-1]
    for yi, g in zip(y, groups):
        ax.errorbar(g.test.mean, yi, xerr=[[g.test.mean - g.test.low], [g.test.high - g.test.mean]], fmt="o",
                    color="black", capsize=3)
        if g.test_rows is not None:
            ax.errorbar(g.test_rows.mean, yi - 0.2, xerr=[[g.test_rows.mean - g.test_rows.low],
                                                          [g.test_rows.high - g.test_rows.mean]],
                        fmt="s", color="gray", ms=3, capsize=2)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{g.first['name'] or g.key} ({g.seeds} seed{'s' * (g.seeds > 1)})" for g in groups],
                       fontsize=7)
    ax.set(xlabel="test accuracy (black: 95% over seeds; grey: 95% bootstrap over rows)",
           title="configs with their intervals")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()
