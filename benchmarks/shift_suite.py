"""Shifted target sets with known labels, built from the shipped AG News test split, and what each adaptation does
on them (embedded all-MiniLM-L6-v2; accuracies are this small model's at this small scale, not RoBERTa-base's).

Shifts (each `--rows` texts, balanced unless said otherwise):
  none       the test rows as they are (the control: nothing should change)
  skew       a resampled class mix (--skew, default 55/25/12/8%): label shift only
  no_title   the title dropped from "title + description" (approximate: cut after the source dash "(AP) AP - ",
             else after the leading run of capitalised title words, else after the first 6 words)
  noise      heavy edits: WordNet synonyms (30% of words), word swaps (5%), typos (5% of characters)
  joined     two same-class texts joined into one long text

For each: accuracy of the base run (argmax at its max_length, and read at 256 tokens), prior correction forced and
gated (EM + BBSE agreement + separability, adapt.decide), and one self-training round on the set's own texts
(class-balanced top --share per class, mixed to --mix of the training rows, --st-steps steps), with its round gate.

    OMP_NUM_THREADS=1 python benchmarks/shift_suite.py --out runs/shift_suite
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


def balanced(test: pd.DataFrame, n: int, seed: int) -> pd.DataFrame:
    per = n // test.label.nunique()
    parts = [test[test.label == c].sample(per, random_state=seed) for c in sorted(test.label.unique())]
    return pd.concat(parts).sample(frac=1, random_state=seed).reset_index(drop=True)


def build_sets(test: pd.DataFrame, rows: int, skew: list[float], seed: int) -> dict[str, pd.DataFrame]:
    from budgetlora.data.augment import Augmenter

    sets = {"none": balanced(test, rows, seed)}
    counts = np.round(np.asarray(skew) / sum(skew) * rows).astype(int)
    sets["skew"] = pd.concat([test[test.label == c].sample(k, random_state=seed + 1) for c, k in enumerate(counts)]
                             ).sample(frac=1, random_state=seed).reset_index(drop=True)
    base = balanced(test, rows, seed + 2)
    sets["no_title"] = base.assign(text=[drop_title(t) for t in base.text])
    noisy = Augmenter(AugmentConfig(synonym=0.3, swap=0.05, char_noise=0.05))
    rng = random.Random(seed)
    base = balanced(test, rows, seed + 3)
    sets["noise"] = base.assign(text=[noisy.augment(t, rng) for t in base.text])
    first, second = balanced(test, rows, seed + 4), []
    for t, y in zip(first.text, first.label):
        pool = test[(test.label == y) & (test.text != t)]
        second.append(pool.text.iloc[rng.randrange(len(pool))])
    sets["joined"] = first.assign(text=[a + " " + b for a, b in zip(first.text, second)])
    return sets


def base_config(args) -> Config:
    return Config.from_yaml(ROOT / "configs" / "minilm-default.yaml").replace(**{
        "data.train_limit": args.train_rows, "data.val_fraction": args.val_fraction, "data.test_limit": 1000,
        "train.eval_every": 0, "model.max_length": args.max_length, "name": "shift-suite-base"})


def accuracy(labels, gold) -> float:
    return round(float((np.asarray(labels) == np.asarray(gold)).mean()), 4)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/shift_suite", help="runs, shifted sets and results go here")
    ap.add_argument("--train-rows", type=int, default=3600, help="stratified training subset of the base run")
    ap.add_argument("--val-fraction", type=float, default=0.1)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--rows", type=int, default=1200, help="texts per shifted set")
    ap.add_argument("--skew", default="0.55,0.25,0.12,0.08", help="class mix of the 'skew' set")
    ap.add_argument("--share", type=float, default=0.3, help="self-training: top share per predicted class")
    ap.add_argument("--mix", type=float, default=0.3, help="self-training: pseudo rows' share of the training rows")
    ap.add_argument("--st-steps", type=int, default=40, help="self-training: optimizer steps of the round")
    ap.add_argument("--st-lr", type=float, default=5e-4)
    ap.add_argument("--max-val-drop", type=float, default=0.01, help="self-training round gate")
    ap.add_argument("--only", default="", help="comma-separated subset of shifts")
    ap.add_argument("--no-self-train", action="store_true")
    ap.add_argument("--resume", action="store_true",
                    help="keep the shifts already in OUT/shift_suite.json (each records its own sizes)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    from budgetlora.data.readers import default_data_dir
    from budgetlora.inference.load import load_run
    from budgetlora.shift.analysis import analyse
    from budgetlora.shift.selftrain import self_train
    from budgetlora.training.train import train

    out = Path(args.out)
    quiet = lambda *a, **k: None  # noqa: E731
    t0 = time.time()
    base = train(base_config(args), root=out)
    test = pd.read_csv(default_data_dir() / "test.csv.gz")
    sets = build_sets(test, args.rows, [float(x) for x in args.skew.split(",")], args.seed)
    if args.only:
        sets = {k: v for k, v in sets.items() if k in args.only.split(",")}
    saved = out / "shift_suite.json"
    results = runs.read_json(saved)["results"] if args.resume and saved.is_file() else {}
    for name, df in sets.items():
        if name in results:
            continue
        ts = time.time()
        path = out / "sets" / f"{name}.csv"
        runs.write_text(path, df[["text"]].to_csv(index=False))  # texts only: nothing downstream sees a label
        texts, gold = df.text.tolist(), df.label.to_numpy()
        loaded = load_run(base)
        res = analyse(loaded, texts, mode="auto", log=quiet)
        rep = res.report
        row = {"rows": len(texts), "base": accuracy(res.probs.argmax(1), gold),
               "prior_forced": accuracy(res.em.posteriors.argmax(1), gold),
               "prior_gated": accuracy(res.labels, gold), "gate_applied": res.decision.apply,
               "gate_reasons": res.decision.reasons, "auc": rep["separability"]["auc"],
               "auc_adjusted": rep["separability"]["auc_label_adjusted"],
               "em_priors": rep["class_shares"]["em_priors"], "bbse_priors": rep["class_shares"]["bbse_priors"],
               "true_priors": (np.bincount(gold, minlength=4) / len(gold)).round(4).tolist(),
               "truncated_share": rep["token_lengths"]["target"]["truncated_share"]}
        loaded.max_length = 256
        row["base_len256"] = accuracy(loaded.logits(texts).argmax(1), gold)
        del loaded
        if not args.no_self_train:
            records: list = []
            made = self_train(base, str(path), out / "selftrain" / name, share=args.share, threshold=0.0,
                              mix=args.mix, max_val_drop=args.max_val_drop, records=records, log=quiet,
                              overrides={"train.max_steps": args.st_steps, "train.lr": args.st_lr,
                                         "train.warmup": 0.0, "data.test_limit": 200})
            child = load_run(records[-1]["run"])
            row["self_train"] = accuracy(child.logits(texts).argmax(1), gold)
            row["self_train_gate"] = "kept" if made else "refused"
            row["self_train_record"] = records[-1]
            del child
        row["seconds"] = round(time.time() - ts, 1)
        row["sizes"] = {"rows": len(texts), "st_steps": args.st_steps, "share": args.share, "mix": args.mix}
        results[name] = row
        print(f"{name}: {json.dumps({k: v for k, v in row.items() if k not in ('gate_reasons', 'self_train_record')})}",
              flush=True)
        runs.write_json(saved, {"args": vars(args), "base_run": str(base), "results": results})

    cols = ["base", "base_len256", "prior_forced", "prior_gated", "self_train"]
    print(f"\nshift suite: base run {base.name} ({args.train_rows} rows, max_length {args.max_length}), "
          f"{args.rows} texts per set, embedded all-MiniLM-L6-v2; {time.time() - t0:.0f}s")
    print("| shift | rows | " + " | ".join(cols) + " | gate | AUC (adj.) | ST round |")
    print("|" + "---|" * (len(cols) + 5))
    for name, r in results.items():
        vals = " | ".join(f"{r[c]:.4f}" if c in r else "-" for c in cols)
        print(f"| {name} | {r['rows']} | {vals} | {'applied' if r['gate_applied'] else 'refused'} | "
              f"{r['auc']:.3f} ({r['auc_adjusted']:.3f}) | {r.get('self_train_gate', '-')} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
