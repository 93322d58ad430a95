"""Predictions from a finished run, on one path for every task: metrics on a labelled file (`evaluate_run`), and
answers for an unlabelled one (`predict`): ID,Label (or a multi-label run's ID,Labels), with on request the
probabilities the labels came from, and optionally a post-processor that moves the posteriors before the decision
(a known class mix, `mix.KnownMix`; prior correction, `shift.predict.PriorCorrection`)."""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

import numpy as np

from budgetlora import runs
from budgetlora.config import Config
from budgetlora.data.readers import load_split
from budgetlora.errors import ConfigError
from budgetlora.inference.ensemble import check_members, load_any
from budgetlora.inference.load import LoadedRun, check_long_texts
from budgetlora.inference.mix import Adjusted, priors_path
from budgetlora.tasks import TASKS, Task, softmax, task_of


def evaluate_run(run: str | Path | list, source: str = "", base: str | None = None, long_texts: str = "truncate") -> dict:
    """Metrics of a saved run on a labelled file (default: the config's test split), at the decision settings the
    run was reported with; `Task.evaluate_keys` names the ones `budgetlora evaluate` prints. long_texts: see
    `LoadedRun.long_texts`."""
    loaded = load_any(run, base=base)  # several runs: their ensemble (inference.ensemble)
    loaded.long_texts = check_long_texts(long_texts)
    cfg, task, n = loaded.cfg, loaded.task, loaded.cfg.model.num_labels
    data = load_split(source or cfg.data.test, "test", cfg.data, n, multi=task.sets)
    logits = loaded.logits(data.texts, progress=True)
    return task.metrics(logits, data.labels, n, task.settings(loaded.metrics, n, loaded.path))


def read_unlabelled(source: str, cfg: Config) -> list[str]:
    return load_split(source, "test", cfg.data, cfg.model.num_labels, labelled=False).texts


@dataclass(frozen=True)
class Columns:
    """What a predictions file holds after ID,Label: with `proba`, one probability per class (p_<class name>);
    with `top_k`, the K most probable label ids, each followed by its probability (top1, top1_p, ...)."""

    proba: bool = False
    top_k: int = 0
    names: tuple[str, ...] = ()  # the run's class names, which the p_ columns are named by

    @property
    def wanted(self) -> bool:
        return self.proba or self.top_k > 0

    def named(self, loaded) -> Columns:
        """These columns, named by a loaded run's class names."""
        return replace(self, names=tuple(loaded.class_names))

    def header(self, num_labels: int) -> list[str]:
        names = list(self.names)
        # a column name must say which class it is: unnamed, mismatched or repeated names fall back to the ids
        if len(names) != num_labels or len(set(names)) != num_labels:
            names = [str(i) for i in range(num_labels)]
        out = [f"p_{x}" for x in names] if self.proba else []
        for k in range(1, self.top_k + 1):
            out += [f"top{k}", f"top{k}_p"]
        return out

    def values(self, probs: np.ndarray) -> list[list[str]]:
        """One row of cells per text. Each probability is written as the shortest text that reads back as the
        same float, so the written columns rank the classes exactly as the labels were chosen (argmax == Label)."""
        # stable, so equal probabilities keep the lower id first, as argmax does
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.top_k]
        rows = []
        for p, top in zip(probs, order):
            row = [str(x) for x in p] if self.proba else []
            for i in top:
                row += [str(int(i)), str(p[i])]
            rows.append(row)
        return rows


def columns(run: str | Path | Config, proba: bool = False, top_k: int | None = None) -> Columns:
    """The columns asked for, checked against the run's config (or the run folder's) before anything is loaded or
    written. top_k: None for none; otherwise 1 to the run's number of classes. Single-label runs only: a label
    set has no one ranking of classes to show."""
    cfg = run if isinstance(run, Config) else runs.load_config(Path(run))
    if (proba or top_k is not None) and task_of(cfg).sets:
        raise ConfigError("--proba and --top-k apply to single-label runs only (model.problem_type single)")
    if top_k is None:
        return Columns(proba=bool(proba))
    if isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1:
        raise ConfigError(f"--top-k must be a whole number of at least 1, got {top_k!r}")
    n = cfg.model.num_labels
    if top_k > n:
        raise ConfigError(f"--top-k {top_k} is more than the run's {n} classes")
    return Columns(proba=bool(proba), top_k=int(top_k))


def probabilities(logits: np.ndarray) -> np.ndarray:
    """Plain softmax, as `Classifier.predict_proba` answers; in float64, where two different logits never share
    a probability, so argmax of the probabilities is argmax of the logits."""
    return softmax(np.asarray(logits, dtype=np.float64))


def write_answers(path: str | Path, answers: np.ndarray, probs: np.ndarray | None = None,
                  cols: Columns | None = None, task: Task = TASKS["single"], delimiter: str = ";") -> None:
    """ID and the task's answer column (Label: a class id; Labels: a label set joined by `delimiter`), and the
    probability columns of `cols` when it asks for any (computed from `probs`)."""
    cols = cols if cols is not None and cols.wanted else None
    if cols is not None and (probs is None or len(probs) != len(answers)):
        raise ValueError("probability columns need one row of probabilities per label")
    cells = task.answer_cells(answers, delimiter)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    if cols is None:
        w.writerow(["ID", task.answer_column])
        w.writerows(enumerate(cells))
    else:
        w.writerow(["ID", task.answer_column, *cols.header(probs.shape[1])])
        w.writerows([i, x, *row] for i, (x, row) in enumerate(zip(cells, cols.values(probs))))
    runs.write_text(Path(path), buf.getvalue())


@dataclass
class Prediction:
    """Answers written to `output`; with a post-processor, also what `<output>.priors.json` holds."""

    labels: np.ndarray  # class ids (n,), or a multi-label run's 0/1 label-set matrix (n, num_labels)
    output: Path
    priors: dict | None = None  # the post-processor's record: estimates, the mix, the decision; None without one
    task: Task = TASKS["single"]

    @property
    def decision(self) -> dict | None:
        return None if self.priors is None else self.priors["decision"]

    @property
    def priors_file(self) -> Path:
        return priors_path(self.output)

    def summary(self) -> list[str]:
        """What `budgetlora predict` prints."""
        if self.task.sets:
            chosen = self.labels
            return [f"wrote {len(chosen):,} label sets to {self.output} (rows per label "
                    f"{chosen.sum(axis=0).tolist()}, {int((chosen.sum(axis=1) == 0).sum()):,} with none)"]
        counts = dict(enumerate(np.bincount(self.labels).tolist()))
        lines = [f"wrote {len(self.labels):,} predictions to {self.output} (label counts {counts})"]
        if self.priors is not None and self.priors["decision"]["mode"] == "known-mix":
            est = self.priors
            lines += [f"fitted to the class mix {est['target_prior']}: predicted shares {est['shares_before']} -> "
                      f"{est['shares_after']}, {est['labels_changed']:,} labels changed -> {self.priors_file}"]
        elif self.priors is not None:
            est, d = self.priors, self.priors["decision"]
            lines += [f"estimated class priors {est['priors']} (EM; BBSE {(est['bbse'] or {}).get('priors')}; trained "
                      f"under {est['train_priors']}) -> {self.priors_file}",
                      f"prior correction {'applied' if d['apply'] else 'not applied'} ({d['mode']}): "
                      + "; ".join(d["reasons"])]
        return lines


class PostProcessor(Protocol):
    """Moves a single-label run's posteriors on a whole target set before the decision (`mix.KnownMix`,
    `shift.predict.PriorCorrection`)."""

    windows: bool  # whether it reads a long text whole when asked to (its logits come from LoadedRun.logits)

    def check(self, cfg: Config) -> None: ...  # refuse a bad setting before the model loads

    def __call__(self, loaded: LoadedRun, texts: list[str], source: str) -> Adjusted: ...


def predict(run: str | Path | list, source: str, output: str | Path, base: str | None = None, max_length: int = 0,
            proba: bool = False, top_k: int | None = None, post: PostProcessor | None = None,
            long_texts: str = "truncate") -> Prediction:
    """`budgetlora predict`: the run's answers for every row of `source`, in row order, written to `output` once
    the reload check passed. `proba` / `top_k` add the probabilities the labels came from (see `Columns`); `post`
    moves the posteriors first and records how in `<output>.priors.json`. max_length: tokens read per text (0 = the
    run's model.max_length); longer reads long texts past the training cut. long_texts: "truncate" reads a text's
    first max_length tokens, "chunk" all of it in windows (`LoadedRun.long_texts`). Everything that can be refused
    is refused before the model loads."""
    long_texts = check_long_texts(long_texts)
    if long_texts == "chunk" and post is not None and not post.windows:
        raise ConfigError("--long-texts chunk does not combine with --prior-correction (its shift analysis reads "
                          "each text's start); use --target-prior, or read longer texts with --max-length")
    several = isinstance(run, (list, tuple)) and len(run) > 1
    if several:
        check_members(run)
    cfg = _run_config(run[0] if isinstance(run, (list, tuple)) else run)
    task = task_of(cfg)
    cols = columns(cfg, proba, top_k)
    if post is not None:
        if several:  # its estimates read one run's validation confusion matrix and training priors
            raise ConfigError("--prior-correction and --target-prior take one run, not an ensemble")
        if task.sets:
            raise ConfigError("--prior-correction and --target-prior apply to single-label runs only")
        post.check(cfg)
        runs.check_output(priors_path(output))
    runs.check_output(output)
    loaded = load_any(run, base=base)  # verify_reload runs here (for every member), before anything is written
    loaded.max_length, loaded.long_texts = max_length, long_texts
    texts = read_unlabelled(source, loaded.cfg)
    if post is not None:
        return write_prediction(output, post(loaded, texts, source), cols.named(loaded))
    logits = loaded.logits(texts, progress=True)
    answers = loaded.decide(logits)
    write_answers(output, answers, probabilities(logits) if cols.wanted else None, cols.named(loaded), task,
                  cfg.data.label_delimiter)
    return Prediction(answers, Path(output), task=task)


def write_prediction(output: str | Path, adjusted: Adjusted, cols: Columns | None = None) -> Prediction:
    """A post-processed answer written: its record to `<output>.priors.json`, then ID,Label (and the `cols` asked
    for, from the posteriors the labels are the argmax of)."""
    runs.write_json(priors_path(output), adjusted.record)
    write_answers(output, adjusted.labels, adjusted.probs, cols)
    return Prediction(adjusted.labels, Path(output), adjusted.record)


def _run_config(run: str | Path) -> Config:
    if not Path(run).is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")  # as load_run words it
    return runs.load_config(Path(run))
