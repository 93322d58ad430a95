"""Shifted target sets with known labels, built from the shipped AG News test split, and what each adaptation does
on them (embedded all-MiniLM-L6-v2; accuracies are this small model's at this small scale, not RoBERTa-base's).

Shifts (each `--rows` texts, balanced unless said otherwise):
  none       the test rows as they are (the control: nothing should change)
  skew       a resampled class mix (--skew, default 55/25/12/8%): label shift only
  no_title   the title dropped from "title + description" (approximate: cut after the source dash "(AP) AP - ",
             else after the leading run of capitalised title words, else after the first 6 words)
  noise      heavy edits: WordNet synonyms (30% of words), word swaps (5%), typos (5% of characters)
  joined     two same-class texts joined into one long text
  short      each text cut to its first 8 words (roughly the title)
  no_words   every text without the 40 words of TYPICAL (10 per class, each mostly seen in its own class's test
             rows), whatever its label: the classes lose their surest cues unevenly, so predicted shares skew

For each shift and seed: the base run's accuracy by argmax; its posteriors over the whole set fitted to the TRUE class
mix (inference.mix.fit_to_mix; uniform, or --skew for `skew`); gated EM prior correction (EM + BBSE agreement +
separability, priors.decide); one self-training round on the set's own texts (class-balanced top --share per class,
mixed to --mix of the training rows, --st-steps steps) from plain posteriors and from posteriors fitted to the true
mix; and an LP-FT base (train.probe_steps: the head alone for --probe-steps steps, then the adapters join) read by
argmax and fitted to the true mix. "share gap" is the largest |predicted share - true share| of the base's argmax.
Everything repeats for seeds --seed .. --seed+K-1 (base runs' train.seed and the sets' sampling); the table prints
the mean ± half the range over seeds, the results json keeps every seed's rows.

    OMP_NUM_THREADS=1 python benchmarks/shift_suite.py --out runs/shift_suite
    python benchmarks/shift_suite.py --config mpnet-cpu --out runs/shift_suite_mpnet   # MPNet-base as the base
    python benchmarks/shift_suite.py --config mpnet-cpu --out runs/shift_suite_mpnet --resume --against runs/shift_suite
        # and its base paired with MiniLM's on the same sets (same --rows, --skew and seeds), row by row
"""
from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from budgetlora import runs  # noqa: E402
from budgetlora.config import AugmentConfig, Config  # noqa: E402

SMALL = {"a", "an", "the", "of", "in", "on", "to", "for", "and", "at", "with", "by", "as", "from", "vs", "vs.",
         "is", "or", "up", "over", "after", "into", "out"}
_DASH = re.compile(r"^.{8,200}?\s-{1,2}\s")
# each class's most typical words on the test split (frequent in the class, rare outside it), fixed so every seed
# and every reader removes the same ones
TYPICAL = {
    "World": "iraq iraqi baghdad killed minister troops president military palestinian israeli",
    "Sports": "league season cup win coach football championship team game victory",
    "Business": "stocks prices oil profit shares percent investors earnings billion quarter",
    "Sci/Tech": "microsoft internet software computer space scientists technology web users online",
}
_TYPICAL = re.compile(r"\b(?:" + "|".join(" ".join(TYPICAL.values()).split()) + r")(?:'s)?\b", re.IGNORECASE)


def drop_title(text: str) -> str:
    """The description without its title, approximately: AG News rows are 'title description' with nothing in
    between, so the cut is a heuristic (see the module docstring). Never returns an empty text."""
    m = _DASH.match(text)
    if m and len(text) - m.end() > 20:
        return text[m.end():].strip()
    words = text.split()
    k = 0
    while k < len(words) and (words[k][:1].isupper() or words[k][:1].isdigit() or words[k].lower() in SMALL):
        k += 1
    # the run of title-cased words also swallows the description's first capitalised word; give that one back
    cut = k - 1 if 3 <= k < len(words) else min(6, len(words) - 1)
    return " ".join(words[max(cut, 1):]) or text


def drop_typical(text: str) -> str:
    """The text without any word of TYPICAL (case-insensitive, possessives too). Never returns an empty text."""
    return " ".join(_TYPICAL.sub(" ", text).split()) or text


def balanced(test: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    per = n // test.label.nunique()
    parts = [test[test.label == c].sample(per, random_state=seed) for c in sorted(test.label.unique())]
    return pd.concat(parts).sample(frac=1, random_state=seed).reset_index(drop=True)


def build_sets(test: pd.DataFrame, rows: int, skew: list[float], seed: int) -> dict[str, pd.DataFrame]:
    from budgetlora.data.augment import Augmenter, WordNetMissing

    sets = {"none": balanced(test, rows, seed)}
    counts = np.round(np.asarray(skew) / sum(skew) * rows).astype(int)
    sets["skew"] = pd.concat([test[test.label == c].sample(k, random_state=seed + 1) for c, k in enumerate(counts)]
                             ).sample(frac=1, random_state=seed).reset_index(drop=True)
    base = balanced(test, rows, seed + 2)
    sets["no_title"] = base.assign(text=[drop_title(t) for t in base.text])
    rng = random.Random(seed)
    base = balanced(test, rows, seed + 3)
    try:
        noisy = Augmenter(AugmentConfig(synonym=0.3, swap=0.05, char_noise=0.05))
        sets["noise"] = base.assign(text=[noisy.augment(t, rng) for t in base.text])
    except WordNetMissing as e:  # the other shifts need no WordNet: measure them, say what is missing
        print(f"shift 'noise' skipped: {e}", flush=True)
    first, second = balanced(test, rows, seed + 4), []
    for t, y in zip(first.text, first.label):
        pool = test[(test.label == y) & (test.text != t)]
        second.append(pool.text.iloc[rng.randrange(len(pool))])
    sets["joined"] = first.assign(text=[a + " " + b for a, b in zip(first.text, second)])
    base = balanced(test, rows, seed + 5)
    sets["short"] = base.assign(text=[" ".join(t.split()[:8]) for t in base.text])
    base = balanced(test, rows, seed + 6)
    sets["no_words"] = base.assign(text=[drop_typical(t) for t in base.text])
    return sets


def base_config(args, seed: int, probe_steps: int = 0) -> Config:
    changes = {"data.train_limit": args.train_rows, "data.val_fraction": args.val_fraction,
               "data.test_limit": 200 if args.smoke else 1000, "train.eval_every": 0, "train.seed": seed,
               "model.max_length": args.max_length, "name": "shift-suite-lpft" if probe_steps else "shift-suite-base"}
    if args.smoke:
        changes["train.max_steps"] = 10
    # the preset has its own probe: the plain base has none, so that the two bases differ in exactly that
    changes["train.probe_steps"] = probe_steps
    return Config.from_yaml(args.config).replace(**changes)


def accuracy(labels, gold) -> float:
    return round(float((np.asarray(labels) == np.asarray(gold)).mean()), 4)


def shares(labels, n: int = 4) -> np.ndarray:
    return np.bincount(np.asarray(labels), minlength=n) / max(len(labels), 1)


def pm(values: list) -> str:
    """mean ± half the range over seeds ('-' when no seed has the value)."""
    v = [x for x in values if x is not None]
    return f"{np.mean(v):.4f} ± {(max(v) - min(v)) / 2:.4f}" if v else "-"


def measure(args, name: str, df: pd.DataFrame, base: Path, lpft: Path | None, known: str, out: Path) -> dict:
    """One shifted set under one seed's runs: every column of the table, and what they were decided on."""
    from budgetlora.inference.load import load_run
    from budgetlora.shift.analysis import analyse
    from budgetlora.inference.mix import fit_to_mix, parse_prior
    from budgetlora.shift.priors import calibrated_probabilities
    from budgetlora.shift.selftrain import self_train

    path = out / "sets" / f"{name}.csv"
    runs.write_text(path, df[["text"]].to_csv(index=False))  # texts only: nothing downstream sees a label
    texts, gold = df.text.tolist(), df.label.to_numpy()
    mix, true = parse_prior(known, 4), shares(gold)
    loaded = load_run(base)
    res = analyse(loaded, texts, mode="auto")
    del loaded
    rep, pred, fitted = res.report, res.probs.argmax(1), fit_to_mix(res.probs, mix).labels
    row = {"rows": len(texts), "known_prior": known, "base": accuracy(pred, gold),
           "known_mix": accuracy(fitted, gold),
           "prior_forced": accuracy(res.em.posteriors.argmax(1), gold), "prior_gated": accuracy(res.labels, gold),
           "gate_applied": res.decision.apply, "gate_reasons": res.decision.reasons,
           "auc": rep["separability"]["auc"], "auc_adjusted": rep["separability"]["auc_label_adjusted"],
           "em_priors": rep["class_shares"]["em_priors"], "bbse_priors": rep["class_shares"]["bbse_priors"],
           "true_priors": true.round(4).tolist(), "pred_shares": shares(pred).round(4).tolist(),
           "share_gap": round(float(np.abs(shares(pred) - true).max()), 4),
           "truncated_share": rep["token_lengths"]["target"]["truncated_share"],
           # per row, for a paired comparison of two suites' bases on the same sets (--against)
           "gold": gold.tolist(), "base_pred": pred.tolist(),
           "known_mix_pred": fitted.tolist()}
    if not args.no_self_train:
        # the same round twice: pseudo labels from the plain posteriors, then from posteriors fitted to the true mix
        for col, prior in (("self_train", ""), ("self_train_fit", known)):
            records: list = []
            made = self_train(base, str(path), out / "selftrain" / (name + ("-fit" if prior else "")),
                              share=args.share, threshold=0.0, mix=args.mix, max_val_drop=args.max_val_drop,
                              target_prior=prior, records=records, first_probs=res.probs,
                              overrides={"train.max_steps": args.st_steps, "train.lr": args.st_lr,
                                         "train.warmup": 0.0, "data.test_limit": 200})
            child = load_run(records[-1]["run"])
            row[col] = accuracy(child.logits(texts).argmax(1), gold)
            row[f"{col}_gate"] = "kept" if made else "refused"
            row[f"{col}_record"] = records[-1]
            del child
    if lpft is not None:
        loaded = load_run(lpft)
        probs = calibrated_probabilities(loaded.logits(texts), loaded.metrics.get("temperature"))
        del loaded
        row.update(lpft=accuracy(probs.argmax(1), gold), lpft_known_mix=accuracy(fit_to_mix(probs, mix).labels, gold),
                   lpft_pred_shares=shares(probs.argmax(1)).round(4).tolist())
    return row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/shift_suite", help="runs, shifted sets and results go here")
    ap.add_argument("--config", default=str(ROOT / "configs" / "minilm-default.yaml"),
                    help="the base runs' preset (a file or a shipped name: mpnet-cpu for the 12 x 768 shape); the "
                         "suite's sizes replace its data sizes")
    ap.add_argument("--train-rows", type=int, default=3600, help="stratified training subset of the base runs")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rows", type=int, default=1000, help="texts per shifted set (at least 800)")
    ap.add_argument("--skew", default="0.55,0.25,0.12,0.08", help="class mix of the 'skew' set (sums to 1)")
    ap.add_argument("--share", type=float, default=0.3, help="self-training: top share per predicted class")
    ap.add_argument("--mix", type=float, default=0.3, help="self-training: pseudo rows' share of the training rows")
    ap.add_argument("--st-steps", type=int, default=40, help="self-training: optimizer steps of the round")
    ap.add_argument("--st-lr", type=float, default=5e-4)
    ap.add_argument("--max-val-drop", type=float, default=0.01, help="self-training round gate")
    ap.add_argument("--probe-steps", type=int, default=100, help="LP-FT base: head-only steps first (0 = no LP-FT)")
    ap.add_argument("--only", default="", help="comma-separated subset of shifts")
    ap.add_argument("--no-self-train", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep the (seed, shift) rows already in OUT/shift_suite.json (each records its own sizes)")
    ap.add_argument("--against", default="",
                    help="another suite's OUT (e.g. the MiniLM base): its bases paired with these on the same sets")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=2, help="repeat for seeds --seed .. --seed+K-1")
    ap.add_argument("--smoke", action="store_true",
                    help="a run-through, not a measurement: base runs stop after 10 steps and test on 200 rows, "
                         "and --rows may be below 800")
    args = ap.parse_args()
    if args.rows < 800 and not args.smoke:
        ap.error("--rows must be at least 800: fewer texts leave differences of a point within sampling noise")

    from budgetlora.data.readers import default_data_dir
    from budgetlora.training.train import train

    out, t0 = Path(args.out), time.time()
    seeds = list(range(args.seed, args.seed + args.seeds))
    test = pd.read_csv(default_data_dir() / "test.csv.gz")
    saved = out / "shift_suite.json"
    done = runs.read_json(saved).get("seeds", {}) if args.resume and saved.is_file() else {}
    state: dict = {}
    for seed in seeds:
        base = train(base_config(args, seed), root=out)
        lpft = train(base_config(args, seed, args.probe_steps), root=out) if args.probe_steps > 0 else None
        accs = {k: runs.read_json(r / runs.METRICS)["test_accuracy"] for k, r in (("base", base), ("lpft", lpft)) if r}
        results = dict(done.get(str(seed), {}).get("results", {}))
        state[str(seed)] = {"base_run": str(base), "lpft_run": str(lpft) if lpft else None,
                            "test_accuracy": accs, "results": results}
        sets = build_sets(test, args.rows, [float(x) for x in args.skew.split(",")], seed)
        for name, df in sets.items():
            # a row is done unless it lacks the LP-FT columns this invocation asks for
            if (args.only and name not in args.only.split(",")) or \
                    (name in results and ("lpft" in results[name] or lpft is None)):
                continue
            ts = time.time()
            row = measure(args, name, df, base, lpft, args.skew if name == "skew" else "uniform", out / f"seed{seed}")
            row["seconds"] = round(time.time() - ts, 1)
            row["sizes"] = {"rows": len(df), "train_rows": args.train_rows, "st_steps": args.st_steps,
                            "share": args.share, "mix": args.mix, "probe_steps": args.probe_steps}
            results[name] = row
            print(f"seed {seed} {name}: " + json.dumps({k: v for k, v in row.items()
                                                        if k not in ("gate_reasons", "gold")
                                                        and not k.endswith(("_record", "_pred"))}),
                  flush=True)
            runs.write_json(saved, {"args": vars(args), "seeds": {**done, **state}})
    runs.write_json(saved, {"args": vars(args), "seeds": {**done, **state}})

    cols = [("share gap", "share_gap"), ("base", "base"), ("known mix", "known_mix"), ("gated EM", "prior_gated"),
            ("self-train", "self_train"), ("self-train fitted", "self_train_fit"), ("LP-FT", "lpft"),
            ("LP-FT known mix", "lpft_known_mix")]
    names = list(dict.fromkeys(n for s in seeds for n in state[str(s)]["results"]))  # in the order measured
    clean = {k: pm([state[str(s)]["test_accuracy"].get(k) for s in seeds]) for k in ("base", "lpft")}
    print(f"\nshift suite: {base_config(args, seeds[0]).model.name}, {args.train_rows} train rows, {args.rows} rows per set, "
          f"seeds {seeds[0]}-{seeds[-1]} ({len(seeds)}; mean ± half the range); max_length {args.max_length}, "
          f"LP-FT probe_steps {args.probe_steps}{' (smoke: 10-step bases)' if args.smoke else ''}; "
          f"{time.time() - t0:.0f}s")
    print(f"clean test accuracy (metrics.json): base {clean['base']}, LP-FT {clean['lpft']}\n")
    print("| shift | true mix | " + " | ".join(c for c, _ in cols) + " | EM gate applied |")
    print("|" + "---|" * (len(cols) + 3))
    for name in names:
        rows = [state[str(s)]["results"][name] for s in seeds if name in state[str(s)]["results"]]
        vals = " | ".join(pm([r.get(k) for r in rows]) for _, k in cols)
        known = "uniform" if rows[0]["known_prior"] == "uniform" else "/".join(
            f"{float(x) * 100:.0f}" for x in rows[0]["known_prior"].split(","))
        print(f"| {name} | {known} | {vals} | {sum(r['gate_applied'] for r in rows)}/{len(rows)} |")
    if args.against:
        against(state, seeds, Path(args.against))
    return 0


def against(state: dict, seeds: list[int], other_out: Path) -> None:
    """This suite's base against another's (another model, the same sets): per shift, the paired difference in
    accuracy, argmax and fitted to the known mix, pooled over the seeds both ran; a bootstrap over the sets' rows (each
    seed's set paired by position) and McNemar's exact p. Sets must be the same texts: the gold labels are checked."""
    from budgetlora.experiments.stats import paired

    other = runs.read_json(other_out / "shift_suite.json")
    other_model = other.get("args", {}).get("config", str(other_out))
    print(f"\nagainst {other_model} ({other_out}): this base minus that base, on the same rows\n")
    print("| shift | seeds | this base | that base | difference [95%] | McNemar p | "
          "this known mix | that known mix | difference [95%] | McNemar p |")
    print("|" + "---|" * 10)
    for name in dict.fromkeys(n for s in seeds for n in state[str(s)]["results"]):
        pairs = [(state[str(s)]["results"].get(name), other["seeds"].get(str(s), {}).get("results", {}).get(name))
                 for s in seeds]
        pairs = [(a, b) for a, b in pairs if a and b and "base_pred" in a and "base_pred" in b]
        if not pairs:
            continue
        if any(a["gold"] != b["gold"] for a, b in pairs):
            raise SystemExit(f"{name}: the two suites' sets differ (another --rows, --skew or seed); nothing to pair")
        cells = [f"{name} | {len(pairs)}"]
        for key in ("base_pred", "known_mix_pred"):
            correct = [[np.asarray(r[key]) == np.asarray(r["gold"]) for r, _ in pairs],
                       [np.asarray(r[key]) == np.asarray(r["gold"]) for _, r in pairs]]
            this, that = (np.concatenate(c) for c in correct)
            d = paired(np.stack(correct[0]), np.stack(correct[1]))
            cells.append(f"{this.mean():.4f} | {that.mean():.4f} | {d.difference.mean * 100:+.2f} "
                         f"[{d.difference.low * 100:+.2f}, {d.difference.high * 100:+.2f}] | {d.mcnemar_p:.2g}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    sys.exit(main())
