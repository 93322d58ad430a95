"""`budgetlora report DIR`: one leaderboard over every finished run under DIR (a sweep folder or any folder of run
folders), ablation plots, and a single self-contained report.html (plots embedded as data URIs).

Written into DIR: leaderboard.csv, leaderboard.md (one row per run), comparison.csv (one row per config: seeds
grouped, intervals, paired marks against the best; see `compare`), report.md (the comparison, the leaderboard and
the plots in one Markdown document), plots/{acc_vs_rank,acc_vs_alpha,acc_by_targets,pareto,intervals}.png and
report.html. Every file is written to a temporary name and renamed into place.
"""
from __future__ import annotations

import base64
import csv
import html
import io
from pathlib import Path

from budgetlora import runs
from budgetlora.adapters import methods
from budgetlora.experiments import compare

# r and alpha are the method's own size and scale (lora.r, adalora.init_r, vera.r, ...; empty for (IA)3)
COLUMNS = ["run_id", "name", "model", "r", "alpha", "targets", "layers", "dropout", "label_smoothing", "lr",
           "trainable_params", "val_accuracy", "test_accuracy", "val_loss", "wall_time_s", "method", "setting",
           "train_time_s"]
# what the leaderboard sorts and plots by: a finished run without them is a damaged one
RANKED_BY = ("val_accuracy", "test_accuracy", "trainable_params")
PLOTS = ("acc_vs_rank", "acc_vs_alpha", "acc_by_targets", "pareto")


def collect(folder: str | Path, run_dirs: list[Path] | None = None) -> list[dict]:
    """One row per finished run under `folder` (or per folder of `run_dirs`, wherever they are), best validation
    accuracy first."""
    rows, folder = [], Path(folder)
    for path in runs.list_runs(folder) if run_dirs is None else [Path(p) for p in run_dirs]:
        cfg = runs.load_config(path)
        m = runs.read_json(path / runs.METRICS, keys=RANKED_BY)
        method = methods.get(cfg.method)
        size, alpha = methods.size(cfg)
        rows.append({
            "run_id": cfg.run_id, "name": cfg.name, "model": cfg.model.name, "r": size,
            "alpha": alpha, "targets": ",".join(map(str, cfg.lora.targets)),
            "method": method.named(cfg), "setting": method.rank_field or "", "alpha_setting": method.alpha_field or "",
            "train_time_s": m.get("train_time_s"),
            "layers": ",".join(map(str, cfg.lora.layers)) or "all", "dropout": cfg.lora.dropout,
            "label_smoothing": cfg.train.label_smoothing, "lr": cfg.train.lr,
            "trainable_params": m.get("trainable_params"), "val_accuracy": m.get("val_accuracy"),
            "test_accuracy": m.get("test_accuracy"), "val_loss": m.get("val_loss"),
            "wall_time_s": m.get("wall_time_s"), "path": _relative(path, folder),
            # the runs of one config over several seeds share this key (see compare.group_runs)
            "config_key": cfg.replace(**{"train.seed": 0}).run_id, "seed": cfg.train.seed,
            **{k: m.get(k) for k in compare.COST_FIELDS if k != "wall_time_s"},
        })
    return sorted(rows, key=lambda r: (-(r["val_accuracy"] or 0.0), r["run_id"]))


def _relative(path: Path, folder: Path) -> str:
    """The run's path from `folder` when it lies inside, else as it is (joined to `folder`, it stays itself)."""
    try:
        return str(path.relative_to(folder))
    except ValueError:
        return str(path.resolve())


def pareto_front(rows: list[dict]) -> list[dict]:
    """Runs no other run beats on both counts: fewer (or equal) trainable params and higher val accuracy."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["trainable_params"], -r["val_accuracy"])):
        if r["val_accuracy"] > best:
            front.append(r)
            best = r["val_accuracy"]
    return front


def _fmt(v, column: str = "") -> str:
    if isinstance(v, float):
        if column in ("val_accuracy", "test_accuracy", "val_loss"):
            return f"{v:.4f}"
        return f"{v:.1f}" if column in ("wall_time_s", "train_time_s") else f"{v:g}"
    if isinstance(v, int) and not isinstance(v, bool) and v >= 10_000:
        return f"{v:,}"
    return "" if v is None else str(v)


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def to_markdown(rows: list[dict]) -> str:
    head = "| # | " + " | ".join(COLUMNS) + " |\n|" + "---|" * (len(COLUMNS) + 1) + "\n"
    body = "".join(f"| {i} | " + " | ".join(_fmt(r[c], c).replace("|", "\\|") for c in COLUMNS) + " |\n"
                   for i, r in enumerate(rows, 1))
    return head + body


def _axis(rows: list[dict], field: str, setting: str) -> str:
    """An ablation axis named by the config fields its runs vary ('lora.r', or 'adalora.init_r, lora.r' when
    methods are mixed), counting only the runs the plot shows."""
    return ", ".join(sorted({r[setting] for r in rows if r[field] is not None and r.get(setting)})) or field


def _figures(rows: list[dict]) -> dict[str, bytes]:
    """PNG bytes of each ablation plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}

    def finish(name, fig):
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        plt.close(fig)
        out[name] = buf.getvalue()

    for name, field, setting in (("acc_vs_rank", "r", "setting"), ("acc_vs_alpha", "alpha", "alpha_setting")):
        label = _axis(rows, field, setting)
        fig, ax = plt.subplots(figsize=(6, 4))
        for targets in sorted({r["targets"] for r in rows}):
            # (IA)3 has no rank and VeRA no alpha: those runs are left out of that plot
            group = sorted((r for r in rows if r["targets"] == targets and r[field] is not None),
                           key=lambda r: r[field])
            ax.plot([r[field] for r in group], [r["val_accuracy"] for r in group], "o", label=f"{targets} (val)")
            ax.plot([r[field] for r in group], [r["test_accuracy"] for r in group], "x", color="gray")
        ax.set(xlabel=label, ylabel="accuracy (o val, x test)", title=f"accuracy vs {label}")
        if field == "r" and len({r["r"] for r in rows}) > 2:
            ax.set_xscale("log", base=2)
        ax.legend(fontsize=7)
        finish(name, fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    sets = sorted({r["targets"] for r in rows}, key=lambda t: -max(r["val_accuracy"] for r in rows
                                                                   if r["targets"] == t))
    best = [max(r["val_accuracy"] for r in rows if r["targets"] == t) for t in sets]
    ax.bar(range(len(sets)), best, color="C0")
    ax.set_xticks(range(len(sets)))
    ax.set_xticklabels(sets, rotation=20, fontsize=8)
    lo = min(best) if best else 0
    ax.set(ylabel="best val accuracy", title="accuracy by target set", ylim=(max(0.0, lo - 0.05), 1.0))
    finish("acc_by_targets", fig)

    fig, ax = plt.subplots(figsize=(7, 4.5))
    labels = sorted({r["method"] for r in rows})
    colours = plt.get_cmap("tab20").colors
    for i, method in enumerate(labels):  # one colour and marker per method: the front shows which spend best
        group = [r for r in rows if r["method"] == method]
        ax.scatter([r["trainable_params"] for r in group], [r["val_accuracy"] for r in group],
                   color=colours[i % len(colours)] if len(labels) > 1 else "lightgray", marker="osD^v<>ph*X"[i % 11],
                   label=method if len(labels) > 1 else "runs", zorder=3)
    front = pareto_front(rows)
    ax.plot([r["trainable_params"] for r in front], [r["val_accuracy"] for r in front], "--", color="black",
            label="Pareto front", zorder=2)
    params = [r["trainable_params"] for r in rows if r["trainable_params"]]
    if params and max(params) > 10 * min(params):  # methods differ by orders of magnitude in what they train
        ax.set_xscale("log")
    ax.set(xlabel="trainable parameters", ylabel="val accuracy", title="parameters vs accuracy")
    ax.legend(fontsize=7, loc="best")
    finish("pareto", fig)
    return out


_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border: 1px solid #ccc; padding: 3px 6px; text-align: right; }}
th {{ background: #f3f3f3; }} td.text {{ text-align: left; }}
tr.pareto td {{ background: #fff4e5; }}
.plots img {{ max-width: 48%; margin: 4px; border: 1px solid #eee; }}
</style></head>
<body>
<h1>{title}</h1>
<p>{n} finished runs, sorted by validation accuracy. Highlighted rows lie on the parameters-vs-accuracy Pareto
front.</p>
<table id="leaderboard"><thead><tr><th>#</th>{head}</tr></thead>
<tbody>
{body}
</tbody></table>
<h2>Ablations</h2>
<div class="plots">
{images}
</div>
<script>
// marks the page once every plot has decoded, so a headless browser check can tell the images are usable
window.addEventListener("load", function () {{
  var imgs = Array.prototype.slice.call(document.images);
  var ok = imgs.filter(function (i) {{ return i.complete && i.naturalWidth > 0; }}).length;
  document.body.setAttribute("data-images-loaded", ok + "/" + imgs.length);
}});
</script>
</body></html>
"""


def to_html(rows: list[dict], pngs: dict[str, bytes], title: str) -> str:
    front = {r["run_id"] for r in pareto_front(rows)} if rows else set()
    text_cols = {"run_id", "name", "model", "targets", "layers", "method", "setting"}
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "\n".join(
        f'<tr class="run{" pareto" if r["run_id"] in front else ""}"><td>{i}</td>'
        + "".join(f'<td class="{"text" if c in text_cols else "num"}">{html.escape(_fmt(r[c], c))}</td>'
                  for c in COLUMNS) + "</tr>"
        for i, r in enumerate(rows, 1))
    images = "\n".join(f'<img alt="{name}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'
                       for name, png in pngs.items())
    return _PAGE.format(title=html.escape(title), n=len(rows), head=head, body=body, images=images)


def write_report(folder: str | Path, title: str | None = None, run_dirs: list[Path] | None = None,
                 source: str | Path | None = None) -> dict[str, Path]:
    """Write the leaderboard, plots and report.html into `folder`, over the finished runs under it or, given, the
    folders `run_dirs` (found under `source`, which names them if none is finished); returns the written paths by
    kind."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    written = {"csv": folder / "leaderboard.csv", "md": folder / "leaderboard.md", "html": folder / "report.html",
               "comparison": folder / "comparison.csv", "report": folder / "report.md"}
    # before every run is read, and before the last report's first file is replaced by the new one
    runs.check_output(folder, "into")
    runs.check_output(folder / "plots", "into")
    for path in written.values():
        runs.check_output(path)
    rows = collect(folder, run_dirs)
    if not rows:
        raise FileNotFoundError(f"no finished runs under {source or folder}")
    runs.write_text(written["csv"], to_csv(rows))
    runs.write_text(written["md"], f"# Leaderboard: {title or folder.name}\n\n" + to_markdown(rows))
    groups = compare.group_runs(rows, folder)
    runs.write_text(written["comparison"], compare.to_csv(groups))
    pngs = {**_figures(rows), "intervals": compare.interval_figure(groups)}
    for name, png in pngs.items():
        path = folder / "plots" / f"{name}.png"
        with runs.atomic_path(path) as tmp:
            tmp.write_bytes(png)
        written[name] = path
    runs.write_text(written["html"], to_html(rows, pngs, f"budgetlora report: {title or folder.name}"))
    runs.write_text(written["report"], report_markdown(title or folder.name, rows, groups, list(pngs)))
    return written


def report_markdown(title: str, rows: list[dict], groups: list, plots: list[str]) -> str:
    """One Markdown document: configs compared with their intervals and marks, every run, and the plots."""
    seeds = sorted({g.seeds for g in groups})
    n_rows = sorted({g.n_rows for g in groups if g.n_rows})
    return "\n".join([
        f"# {title}", "",
        f"{len(groups)} configs, {len(rows)} finished runs; seeds per config: {', '.join(map(str, seeds))}; "
        f"test rows per run: {', '.join(f'{n:,}' for n in n_rows) or 'not recorded'}.", "",
        "## Configs compared", "", compare.to_markdown(groups),
        *(["## Each method at its best setting (chosen on validation)", "", compare.methods_markdown(groups)]
          if len({g.first["method"] for g in groups}) > 1 else []),
        "## Every run", "", to_markdown(rows),
        "## Plots", "", *(f"![{name}](plots/{name}.png)" for name in plots), ""])
