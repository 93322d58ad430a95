"""How far a target set moved from what a run was trained on, measured side by side, and what that means for
adapting to it.

`analyse` compares the run's validation split (held out at training time, so its confidences are honest) with the
target texts: token lengths and the share cut at max_length, vocabulary overlap, confidence and entropy, predicted
class shares against the training priors, the class priors estimated two ways (EM and BBSE, see `priors`), and how
separable the two sets are: a logistic regression told to tell validation from target rows on the encoder's
mean-pooled features, scored by its held-out (cross-fitted) AUC. The separability is measured twice: raw, and with
the validation rows reweighted to the estimated target priors, so that a pure change of class mix reads about 0.5 and
only a change of the texts themselves stays high. The prior-correction gate (`priors.decide`) reads the second.

`write_analysis` writes shift.json, shift.png and advice.txt, each atomically.
"""
from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.data.readers import DataError, Split, load_data, stratified_indices
from budgetlora.data.tokens import encode
from budgetlora.inference.mix import calibrated_probabilities, shares_differ
from budgetlora.shift.priors import (
    BBSEEstimate,
    Decision,
    PriorEstimate,
    bbse_priors,
    decide,
    estimate_priors,
    total_variation,
    train_priors,
    val_confusion,
)
from budgetlora.training.evaluate import predict_logits

logger = logging.getLogger(__name__)

MAX_SIDE = 2000  # rows per side for the separability classifier: enough for a stable AUC, bounded cost
LONG_LENGTH = 256  # the longest input all-MiniLM-L6-v2 was trained on; what the advice offers for long targets
_WORD = re.compile(r"[a-z0-9']+")


# -- measurements -----------------------------------------------------------------------------------------------------
def logits_and_features(loaded, texts: list[str], progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Logits and mean-pooled last hidden states of a loaded run in one pass, in fp32 (the batches and padding of
    `LoadedRun.logits`, so the logits are the ones prediction uses)."""
    return predict_logits(loaded.model, loaded.tokenizer, texts, loaded.read_length,
                          loaded.cfg.train.eval_batch_size, progress=progress, features=True)


def token_lengths(tokenizer, texts: list[str]) -> np.ndarray:
    """Untruncated token counts (special tokens included, as max_length counts them)."""
    return np.asarray([len(x) for x in encode(tokenizer, texts, 100_000)], dtype=np.int64)


def length_stats(lengths: np.ndarray, max_length: int) -> dict:
    return {"mean": round(float(lengths.mean()), 2), "p50": float(np.percentile(lengths, 50)),
            "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max()),
            "truncated_share": round(float((lengths > max_length).mean()), 4)}


def vocab_overlap(reference: list[str], target: list[str], top: int = 10) -> dict:
    """Word-level overlap: the share of the target's word occurrences whose word the reference uses, the Jaccard
    index of the two word sets, and the words most over-represented in the target (smoothed log ratio, seen >= 5)."""
    ref = Counter(w for t in reference for w in _WORD.findall(t.lower()))
    tgt = Counter(w for t in target for w in _WORD.findall(t.lower()))
    n_ref, n_tgt = max(sum(ref.values()), 1), max(sum(tgt.values()), 1)
    covered = sum(c for w, c in tgt.items() if w in ref) / n_tgt
    jaccard = len(ref.keys() & tgt.keys()) / max(len(ref.keys() | tgt.keys()), 1)
    ratio = {w: np.log((c + 1) / n_tgt) - np.log((ref.get(w, 0) + 1) / n_ref) for w, c in tgt.items() if c >= 5}
    return {"target_tokens_covered": round(covered, 4), "type_jaccard": round(jaccard, 4),
            "reference_types": len(ref), "target_types": len(tgt),
            "target_overrepresented": [w for w, _ in sorted(ratio.items(), key=lambda kv: -kv[1])[:top]]}


def entropy(probs: np.ndarray) -> np.ndarray:
    return -(probs * np.log(np.clip(probs, 1e-12, 1.0))).sum(axis=1)


def weighted_auc(s_neg: np.ndarray, s_pos: np.ndarray, w_neg: np.ndarray | None = None) -> float:
    """P(score of a positive > score of a negative), negatives weighted, ties counted half."""
    w_neg = np.ones(len(s_neg)) if w_neg is None else np.asarray(w_neg, dtype=np.float64)
    order = np.argsort(s_neg, kind="stable")
    s, cw = s_neg[order], np.concatenate([[0.0], np.cumsum(w_neg[order])])
    lo, hi = np.searchsorted(s, s_pos, "left"), np.searchsorted(s, s_pos, "right")
    return float((cw[lo] + 0.5 * (cw[hi] - cw[lo])).sum() / (cw[-1] * len(s_pos)))


def _logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float, iters: int = 25) -> np.ndarray:
    """Weighted L2-regularised logistic regression by Newton's method (d + 1 parameters; d is a few hundred)."""
    xb = np.hstack([x, np.ones((len(x), 1))])
    beta = np.zeros(xb.shape[1])
    reg = np.full(xb.shape[1], l2)
    reg[-1] = 0.0  # the intercept is not shrunk
    w = w / w.sum()
    for _ in range(iters):
        p = 1.0 / (1.0 + np.exp(-np.clip(xb @ beta, -30, 30)))
        grad = xb.T @ (w * (p - y)) + reg * beta
        hess = (xb * (w * p * (1 - p))[:, None]).T @ xb + np.diag(reg + 1e-9)
        step = np.linalg.solve(hess, grad)
        beta -= step
        if np.abs(step).max() < 1e-6:
            break
    return beta


def domain_auc(ref: np.ndarray, tgt: np.ndarray, ref_weights: np.ndarray | None = None, folds: int = 5,
               l2: float = 1e-2, seed: int = 0) -> float:
    """Held-out AUC of a reference-vs-target classifier: each row scored by a model fitted on the other folds.
    ref_weights reweight the reference rows in both the fit and the AUC (each side carries equal total weight in
    the fit, so unequal sizes do not tilt it). 0.5 = indistinguishable, 1.0 = perfectly separable."""
    ref, tgt = np.asarray(ref, dtype=np.float64), np.asarray(tgt, dtype=np.float64)
    if len(ref) < folds or len(tgt) < folds:
        raise ValueError(f"domain_auc needs at least {folds} rows per side, got {len(ref)} and {len(tgt)}")
    wr = np.ones(len(ref)) if ref_weights is None else np.asarray(ref_weights, dtype=np.float64)
    x = np.vstack([ref, tgt])
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    y = np.concatenate([np.zeros(len(ref)), np.ones(len(tgt))])
    w = np.concatenate([wr / wr.sum(), np.full(len(tgt), 1.0 / len(tgt))])
    rng = np.random.default_rng(seed)
    fold = np.concatenate([rng.permutation(len(ref)) % folds, rng.permutation(len(tgt)) % folds])
    score = np.zeros(len(x))
    for k in range(folds):
        test = fold == k
        beta = _logistic(x[~test], y[~test], w[~test], l2)
        score[test] = x[test] @ beta[:-1] + beta[-1]
    return weighted_auc(score[: len(ref)], score[len(ref):], wr)


# -- the analysis -----------------------------------------------------------------------------------------------------
@dataclass
class ShiftResult:
    report: dict  # everything shift.json holds
    probs: np.ndarray  # (N, C) calibrated target posteriors
    em: PriorEstimate  # EM estimate; em.posteriors are the prior-corrected posteriors
    bbse: BBSEEstimate | None
    decision: Decision
    hist: dict = field(default_factory=dict)  # the raw distributions, for the figure only

    @property
    def labels(self) -> np.ndarray:
        """Target labels as decided: the corrected posteriors' argmax when the gate applied it, else argmax."""
        return (self.em.posteriors if self.decision.apply else self.probs).argmax(1)


def reference_split(cfg) -> tuple[Split, Split]:
    """The run's own train and validation rows, rebuilt from its config (the split is seeded, so it is the same)."""
    data = load_data(cfg)
    return data["train"], data["val"]


def analyse(loaded, texts: list[str], mode: str = "auto", progress: bool = False, seed: int = 0) -> ShiftResult:
    """Measure the target `texts` against the run's training data and decide on prior correction (`mode`:
    auto = gated, on / off = forced; see priors.decide)."""
    cfg, n = loaded.cfg, loaded.cfg.model.num_labels
    if len(texts) < 10:
        raise DataError(f"shift: {len(texts)} target texts; the separability check needs at least 10")
    train, val = reference_split(cfg)
    cm = val_confusion(loaded.metrics)
    if cm is not None and (cm.shape != (n, n) or int(cm.sum()) != len(val)):
        logger.warning(f"shift: metrics.json's validation confusion matrix ({int(cm.sum())} rows) does not match "
                       f"the rebuilt validation split ({len(val)} rows); BBSE is skipped")
        cm = None
    ref_rows = stratified_indices(val.labels, MAX_SIDE, seed)
    ref = val.subset(ref_rows)
    logger.info(f"shift: {len(texts):,} target texts against {len(ref):,} validation rows ({cfg.model.name}, "
        f"max_length {loaded.read_length})")
    ref_logits, ref_feats = logits_and_features(loaded, ref.texts, progress)
    tgt_logits, tgt_feats = logits_and_features(loaded, texts, progress)
    temperature = loaded.metrics.get("temperature")
    ref_probs = calibrated_probabilities(ref_logits, temperature)
    probs = calibrated_probabilities(tgt_logits, temperature)

    pi_train = train_priors(loaded.metrics, n)
    em = estimate_priors(probs, pi_train)
    pred_counts = np.bincount(probs.argmax(1), minlength=n)
    bbse = bbse_priors(cm, pred_counts) if cm is not None else None

    rng = np.random.default_rng(seed)
    tgt_rows = np.sort(rng.permutation(len(texts))[:MAX_SIDE])
    ref_share = np.bincount(ref.labels, minlength=n) / len(ref)
    # reweight validation rows so their class mix is the estimated target mix: under pure label shift the two
    # sets then look alike, and what separability remains is a change in the texts themselves
    adj = (em.priors / np.maximum(ref_share, 1e-12))[ref.labels]
    auc_raw = domain_auc(ref_feats, tgt_feats[tgt_rows], seed=seed)
    auc_adj = domain_auc(ref_feats, tgt_feats[tgt_rows], adj, seed=seed)
    decision = decide(mode, em, bbse, auc_adj)

    ml = cfg.model.max_length
    train_sample = train.subset(stratified_indices(train.labels, MAX_SIDE, seed))
    len_train, len_tgt = token_lengths(loaded.tokenizer, train_sample.texts), token_lengths(loaded.tokenizer, texts)
    conf_ref, conf_tgt = ref_probs.max(1), probs.max(1)
    ent_ref, ent_tgt = entropy(ref_probs), entropy(probs)
    report = {
        "run": str(loaded.path), "model": cfg.model.name, "max_length": ml, "read_length": loaded.read_length,
        "rows": {"target": len(texts), "reference_val": len(ref), "train_sample": len(train_sample),
                 "separability_target_sample": len(tgt_rows)},
        "token_lengths": {"train": length_stats(len_train, ml), "target": length_stats(len_tgt, ml),
                          "target_truncated_at_256": round(float((len_tgt > LONG_LENGTH).mean()), 4),
                          # what other max_length settings would cut, so the choice can be read off one report
                          "truncated_at": {str(k): {"train": round(float((len_train > k).mean()), 4),
                                                    "target": round(float((len_tgt > k).mean()), 4)}
                                           for k in (64, 128, 256, 512)}},
        "vocabulary": vocab_overlap(train_sample.texts, texts),
        "confidence": {"val_mean": round(float(conf_ref.mean()), 4), "target_mean": round(float(conf_tgt.mean()), 4),
                       "val_share_below_0.9": round(float((conf_ref < 0.9).mean()), 4),
                       "target_share_below_0.9": round(float((conf_tgt < 0.9).mean()), 4)},
        "entropy": {"val_mean": round(float(ent_ref.mean()), 4), "target_mean": round(float(ent_tgt.mean()), 4)},
        "class_shares": {"train_priors": None if pi_train is None else pi_train.round(4).tolist(),
                         "target_predicted": (pred_counts / len(texts)).round(4).tolist(),
                         "em_priors": em.priors.round(4).tolist(),
                         "bbse_priors": None if bbse is None else bbse.priors.round(4).tolist(),
                         # classes whose predicted share strays from the training mix beyond sampling noise
                         "stray_classes": shares_differ(probs.argmax(1), np.full(n, 1.0 / n) if pi_train is None
                                                        else pi_train)},
        "separability": {"auc": round(auc_raw, 4), "auc_label_adjusted": round(auc_adj, 4),
                         "features": "mean-pooled last hidden state of the run's encoder"},
        "prior_correction": decision.as_dict(),
        "label_counts": {"argmax": pred_counts.tolist(),
                         "corrected": np.bincount(em.posteriors.argmax(1), minlength=n).tolist()},
    }
    report["advice"] = advice(report)
    hist = {"len_train": len_train, "len_target": len_tgt, "conf_val": conf_ref, "conf_target": conf_tgt,
            "ent_val": ent_ref, "ent_target": ent_tgt}
    return ShiftResult(report, probs, em, bbse, decision, hist)


def advice(rep: dict) -> list[str]:
    """A few lines a person can act on, from the measured numbers."""
    out = []
    tl, ml = rep["token_lengths"], rep["max_length"]
    t, tr = tl["target"], tl["train"]
    if t["truncated_share"] > max(0.05, 2 * tr["truncated_share"]):
        out.append(f"{t['truncated_share']:.1%} of target texts are longer than max_length {ml} (train "
                   f"{tr['truncated_share']:.1%}; target mean {t['mean']:.0f} vs {tr['mean']:.0f} tokens): predict "
                   f"with --max-length {LONG_LENGTH} (still cuts {tl['target_truncated_at_256']:.1%})")
    sep = rep["separability"]
    if sep["auc_label_adjusted"] >= rep["prior_correction"]["checks"]["max_auc"]:
        out.append(f"the target texts are separable from the training texts (AUC {sep['auc']:.3f}, "
                   f"{sep['auc_label_adjusted']:.3f} after reweighting to the estimated class mix): the texts moved, "
                   "so adapt to them (self-training on the target texts) rather than to a class mix")
    else:
        out.append(f"the target texts look like the training texts once the class mix is accounted for "
                   f"(AUC {sep['auc_label_adjusted']:.3f}; raw {sep['auc']:.3f})")
    if rep["rows"]["reference_val"] < 500:
        out.append(f"separability and BBSE rest on only {rep['rows']['reference_val']} validation rows: a larger "
                   "data.val_fraction (or more training rows) makes both checks sharper")
    cs = rep["class_shares"]
    out.append(f"predicted class shares {cs['target_predicted']} vs training priors {cs['train_priors']}; "
               f"EM estimates {cs['em_priors']}, BBSE {cs['bbse_priors']}")
    if cs.get("stray_classes"):
        out.append(f"the predicted shares of classes {cs['stray_classes']} stray from the training mix by more than "
                   "sampling noise (3 standard errors): if the target's true class mix is known (benchmark test sets "
                   "are often balanced), pass it with --target-prior (predict, submit) to fit the predictions to it; "
                   "an estimated prior follows the skew instead of removing it when the texts moved")
    c = rep["confidence"]
    if c["target_mean"] < c["val_mean"] - 0.03:
        out.append(f"the model is less sure on the target (mean confidence {c['target_mean']:.3f} vs "
                   f"{c['val_mean']:.3f} on validation): expect lower accuracy than validation's")
    v = rep["vocabulary"]
    out.append(f"vocabulary: {v['target_tokens_covered']:.1%} of target words occur in the training sample; "
               f"most over-represented: {', '.join(v['target_overrepresented'][:6])}")
    d = rep["prior_correction"]
    out.append(("prior correction: applied - " if d["apply"] else "prior correction: not applied - ")
               + "; ".join(d["reasons"]))
    return out


# -- files ------------------------------------------------------------------------------------------------------------
def write_analysis(result: ShiftResult, out: str | Path) -> dict[str, Path]:
    """shift.json, shift.png and advice.txt in `out` (each written to a temporary name, then renamed)."""
    out = Path(out)
    paths = {"json": out / "shift.json", "png": out / "shift.png", "advice": out / "advice.txt"}
    runs.write_json(paths["json"], result.report)
    runs.write_text(paths["advice"], "\n".join(result.report["advice"]) + "\n")
    plot(result, paths["png"])
    return paths


def plot(result: ShiftResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rep, h = result.report, result.hist
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    ml = rep["max_length"]
    top = max(np.percentile(h["len_target"], 99), np.percentile(h["len_train"], 99), ml) + 10
    bins = np.linspace(0, top, 50)
    ax = axes[0, 0]
    ax.hist(h["len_train"], bins, alpha=0.55, density=True, label="train")
    ax.hist(h["len_target"], bins, alpha=0.55, density=True, label="target")
    ax.axvline(ml, color="k", ls="--", lw=1)
    t = rep["token_lengths"]
    ax.set(xlabel="tokens", title=f"token length; cut at {ml}: train {t['train']['truncated_share']:.1%}, "
                                  f"target {t['target']['truncated_share']:.1%}")
    ax.legend()
    for ax, key, title in ((axes[0, 1], "conf", "confidence (max calibrated probability)"),
                           (axes[0, 2], "ent", "entropy of the calibrated posteriors")):
        hi = 1.0 if key == "conf" else max(h["ent_val"].max(), h["ent_target"].max(), 1e-3)
        b = np.linspace(0 if key == "ent" else min(h["conf_val"].min(), h["conf_target"].min()), hi, 40)
        ax.hist(h[f"{key}_val"], b, alpha=0.55, density=True, label="validation")
        ax.hist(h[f"{key}_target"], b, alpha=0.55, density=True, label="target")
        ax.set(title=title)
        ax.legend()
    ax = axes[1, 0]
    cs = rep["class_shares"]
    names = [str(i) for i in range(len(cs["target_predicted"]))]
    x = np.arange(len(names))
    series = [("train priors", cs["train_priors"]), ("target predicted", cs["target_predicted"]),
              ("EM", cs["em_priors"]), ("BBSE", cs["bbse_priors"])]
    series = [(k, v) for k, v in series if v is not None]
    for i, (k, v) in enumerate(series):
        ax.bar(x + (i - len(series) / 2 + 0.5) * 0.8 / len(series), v, 0.8 / len(series), label=k)
    ax.set(xticks=x, xticklabels=names, xlabel="class", ylabel="share", title="class shares")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    sep, voc = rep["separability"], rep["vocabulary"]
    ax.bar(["AUC", "AUC label-adjusted", "target words covered", "word-type Jaccard"],
           [sep["auc"], sep["auc_label_adjusted"], voc["target_tokens_covered"], voc["type_jaccard"]],
           color=["C3", "C3", "C2", "C2"])
    ax.axhline(0.5, color="k", lw=0.8, ls=":")
    ax.axhline(rep["prior_correction"]["checks"]["max_auc"], color="C3", lw=0.8, ls="--")
    ax.set(ylim=(0, 1), title="separability (held-out AUC) and vocabulary overlap")
    ax.tick_params(axis="x", labelsize=8)
    ax = axes[1, 2]
    ax.axis("off")
    import textwrap

    ax.text(0, 1, "\n".join(textwrap.fill(a, 70) for a in rep["advice"]), va="top", fontsize=8, family="monospace")
    fig.suptitle(f"shift: {rep['rows']['target']:,} target texts vs run {Path(rep['run']).name} ({rep['model']})")
    fig.tight_layout()
    with runs.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)


__all__ = ["analyse", "write_analysis", "domain_auc", "weighted_auc", "vocab_overlap",
           "token_lengths", "total_variation"]
