"""The experiment tables: the four `configs/sweeps/minilm-table-*.yaml` sweeps on the embedded MiniLM and
`configs/sweeps/mpnet-table.yaml` on MPNet-base (the reference task's 12 x 768 shape), each config against its
table's reference config on the same test rows, as one Markdown document.

    budgetlora sweep configs/sweeps/minilm-table-targets.yaml       # and -methods, -rank-alpha, -training, mpnet-table
    python benchmarks/experiment_table.py [--sweeps sweeps] [--only mpnet-table] > table.md

Per config: the trainable parameters, each seed's test accuracy, the mean with a 95% bootstrap interval over test
rows (pooled over seeds), and the paired difference to the table's reference config (bootstrap over the same rows,
pooled over seeds, with McNemar's exact p). `budgetlora report` compares every config with the one best on
validation instead; here the reference is fixed in advance (the reference project's choice, or the plain config a
variant changes one thing of), because 100 validation rows cannot pick a best one reliably.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from budgetlora.adapters import budget
from budgetlora.experiments import compare
from budgetlora.experiments.leaderboard import collect
from budgetlora.experiments.spec import VARIANT, load_spec
from budgetlora.experiments.stats import paired, row_interval

# spec (and sweep folder) name -> (title, the label of the config every other one is compared with)
TABLES = {
    "minilm-table-targets": ("Which modules, at one budget (LoRA at the largest rank that fits, alpha 16)", "q,v"),
    "minilm-table-rank-alpha": ("Rank and alpha of LoRA on query/value", "r4-alpha16"),
    "minilm-table-methods": ("Adapter methods at their filled size, each at its own learning rate", "lora-2e-3"),
    "minilm-table-training": ("Data strategies and regularisation (LoRA on every linear layer, filled rank)",
                              "baseline"),
    "mpnet-table": ("MPNet-base (12 x 768): modules, head shape and methods at one budget", "qv-r10"),
}


def labels(spec_path: Path) -> dict[str, str]:
    """config key (run id with the seed left out) -> the config's short label in its spec (its variant name, or its
    grid values). By key, not by run name: a run another sweep already finished is reused under that sweep's name."""
    spec = load_spec(spec_path)
    points = spec.points() or [{}]
    if spec.variants:
        points = [{**p, VARIANT: v} for p in points for v in spec.variants]
    out = {}
    for p in points:
        cfg = spec.config(p)
        if spec.fill:
            cfg, _ = budget.fill(cfg)
        out[cfg.replace(**{"train.seed": 0}).run_id] = ",".join(str(v) for _, v in sorted(p.items()))
    return out


def table(folder: Path, spec_path: Path, reference: str) -> tuple[list[str], list[str]]:
    rows = collect(folder)
    if not rows:
        return [f"no finished runs in {folder} yet"], []
    groups = compare.group_runs(rows, folder)
    names = labels(spec_path)
    by_label = {names.get(g.key, g.key): g for g in groups}
    ref = by_label.get(reference)
    lines = ["| config | trainable | method | lr | test accuracy per seed | mean [95% over rows] | vs "
             f"{reference} [95%] | McNemar p | verdict |", "|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, g in sorted(by_label.items(), key=lambda kv: -kv[1].test.mean):
        seeds = " / ".join(f"{r['test_accuracy']:.4f}" for r in g.rows)
        iv = row_interval(g.correct) if g.correct is not None else None
        cell = f"{iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}]" if iv else f"{g.test.mean:.4f}"
        if g is ref or ref is None or g.correct is None or ref.correct is None:
            diff, p, verdict = "reference" if g is ref else "", "", ""
        else:
            d = paired(g.correct, ref.correct)
            diff = f"{d.difference.mean:+.4f} [{d.difference.low:+.4f}, {d.difference.high:+.4f}]"
            p = f"{d.mcnemar_p:.2g}"
            verdict = ("better at 95%" if d.difference.low > 0 else "worse at 95%") if d.significant else "same"
        f = g.first
        lines.append(f"| {name} | {f['trainable_params']:,} | {f['method']} r={f['r']} | {f['lr']:g} | {seeds} | "
                     f"{cell} | {diff} | {p} | {verdict} |")
        if g.seeds > 1:
            notes.append(max(r["test_accuracy"] for r in g.rows) - min(r["test_accuracy"] for r in g.rows))
    wall = sum(r["wall_time_s"] or 0 for r in rows)
    footer = [f"{len(rows)} runs, {len(groups)} configs, seeds {sorted({g.seeds for g in groups})}, "
              f"{sorted({g.n_rows for g in groups})} test rows each; largest seed-to-seed gap of one config "
              f"{f'{max(notes):.4f}' if notes else 'n/a (one seed each)'}; {wall / 60:.0f} min of run time."]
    return lines, footer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sweeps", default="sweeps", help="folder holding the sweep folders (one per spec name)")
    ap.add_argument("--specs", default=str(Path(__file__).resolve().parents[1] / "configs" / "sweeps"),
                    help="folder holding the *-table*.yaml specs")
    ap.add_argument("--only", action="append", choices=sorted(TABLES), default=[], help="these tables only")
    args = ap.parse_args()
    for key in args.only or TABLES:
        title, reference = TABLES[key]
        folder = Path(args.sweeps) / key
        if not folder.is_dir():
            print(f"## {title}\n\nnot run: {folder} is missing\n")
            continue
        lines, footer = table(folder, Path(args.specs) / f"{key}.yaml", reference)
        print(f"## {title}\n\n" + "\n".join(lines) + "\n\n" + "\n".join(footer) + "\n")
    print("Intervals: bootstrap over the test rows, pooled over seeds; 'same' means the paired 95% interval of the "
          "difference holds 0.")


if __name__ == "__main__":
    main()
