"""A finished run as a Python object: `Classifier.predict(texts)`, the surface `budgetlora.load` and `serve` share;
and several runs loaded at once onto the bases they share (`load_many`), with one forward pass for texts that go
to different runs on one base (`mixed_logits`)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.errors import ConfigError
from budgetlora.inference.load import (
    LOGIT_TOLERANCE,
    LoadedRun,
    check_long_texts,
    load_run,
    model_lock,
    share_key,
    verify_reload,
)
from budgetlora.tasks import class_names, set_ids, softmax, task_of
from budgetlora.training.evaluate import exact_fp32, logits_for_ids


class Classifier:
    """A trained adapter on its base model. Batching and length sorting happen inside `LoadedRun.logits`."""

    def __init__(self, loaded: LoadedRun):
        self.run = loaded
        self.class_names: list[str] = class_names(loaded.cfg, loaded.metrics.get("class_names"))

    @property
    def path(self) -> Path:
        return self.run.path

    @property
    def num_labels(self) -> int:
        return self.run.cfg.model.num_labels

    def logits(self, texts: list[str]) -> np.ndarray:
        texts = _check_texts(texts)
        if not texts:  # nothing to batch; keep the (0, num_labels) shape callers index into
            return np.zeros((0, self.num_labels), dtype=np.float32)
        # plain fp32, unlike bulk `predict`: under bf16 a text's probabilities move by up to ~0.004 with whatever
        # else shares its batch, and an answer here (or from `serve`, which batches requests) must not
        return self.run.logits(texts, exact=True)

    def predict_proba(self, texts: list[str]) -> np.ndarray:
        return softmax(self.logits(texts))

    def predict(self, texts: list[str]) -> list[int]:
        return [int(i) for i in self.logits(texts).argmax(axis=1)]

    @property
    def thresholds(self) -> list[float] | None:
        """A multi-label run's per-label thresholds tuned on validation (metrics.json); None for a single-label run."""
        return task_of(self.run.cfg).settings(self.run.metrics, self.num_labels, self.path).get("thresholds")

    def predict_sets(self, texts: list[str]) -> list[list[int]]:
        """A multi-label run's answers: each text's label ids at or above their thresholds tuned on validation."""
        thresholds = self.thresholds
        if thresholds is None:
            raise ConfigError("predict_sets applies to multi-label runs (model.problem_type multi) only")
        return set_ids(self.logits(texts), thresholds)

    def __repr__(self) -> str:
        return f"Classifier({str(self.path)!r}, model={self.run.cfg.model.name!r}, classes={self.class_names})"


def load(run_dir: str | Path | list, verify: bool = True, base: str | None = None,
         long_texts: str = "truncate") -> Classifier:
    """Load a run folder; with `verify`, first prove the reloaded adapter reproduces the trained model.
    A list of run folders loads their ensemble (`inference.ensemble`: calibrated probabilities averaged, the
    members' trainable parameters summed within the budget).
    base: where the run's base model lives now, when it was trained on a local folder that has moved.
    long_texts: "truncate" reads a text's first max_length tokens; "chunk" reads all of it, in windows whose
    logits are pooled (see `LoadedRun.long_texts`)."""
    from budgetlora.inference.ensemble import load_any

    long_texts = check_long_texts(long_texts)
    loaded = load_any(run_dir, verify=verify, base=base)  # verified as trained: on each text's start
    loaded.long_texts = long_texts
    return Classifier(loaded)


def _check_texts(texts) -> list[str]:
    if isinstance(texts, str):  # a bare string would otherwise be classified character by character
        raise TypeError("texts must be a list of strings, not one string")
    texts = list(texts)
    bad = [i for i, t in enumerate(texts) if not isinstance(t, str)]
    if bad:
        raise TypeError(f"texts must all be strings; item {bad[0]} is {type(texts[bad[0]]).__name__}")
    return texts


def load_many(run_dirs: list[str | Path], verify: bool = True, base: str | None = None,
              long_texts: str = "truncate") -> list[Classifier]:
    """Several runs, each verified as `load` verifies one. Runs with the same `share_key` (base model, tokenizer,
    head shape, peft method) become adapters of one peft model, named by their run ids: the base is held once,
    and each run keeps its own adapter and its own copy of the head."""
    long_texts = check_long_texts(long_texts)
    first_of: dict[tuple, LoadedRun] = {}
    out = []
    for i, run_dir in enumerate(map(Path, run_dirs)):
        cfg = runs.load_config(run_dir)
        if base:
            cfg = cfg.replace(**{"model.name": str(base), "model.tokenizer": ""})
        key = share_key(cfg, runs.read_json(run_dir / "adapter_config.json"), run_dir)
        into = first_of.get(key)
        # a module name in peft, unique in the model (peft loads a taken name over the adapter holding it)
        name = "default" if into is None else f"run{i}_" + re.sub(r"\W", "_", cfg.run_id)
        loaded = load_run(run_dir, verify=verify, base=base, into=into, adapter=name)
        loaded.long_texts = long_texts
        first_of.setdefault(key, loaded)
        out.append(Classifier(loaded))
    if verify:  # once more with every adapter in place: a later load must not have changed an earlier run
        for c in out:
            if sum(o.run.model is c.run.model for o in out) > 1:
                verify_reload(c.run)
    return out


def mixed_logits(requests: list[tuple[Classifier, list[str]]]) -> list[np.ndarray]:
    """Logits for texts that go to different runs of one peft model, in one pass per batch: each row is read by
    its own run's adapter and head (peft's `adapter_names`), at its own run's length. The same answers as each
    run's `logits` on its own texts, to float rounding (a batch's padding differs)."""
    runs_ = [c.run for c, _ in requests]
    ids, tags, parts = [], [], []
    for run, (_, texts) in zip(runs_, requests):
        rows, owner = run.token_rows(_check_texts(texts))
        parts.append((len(ids), len(rows), owner, len(texts)))
        ids += rows
        tags += [run.adapter] * len(rows)
    first = runs_[0]
    if not ids:
        return [np.zeros((0, c.num_labels), dtype=np.float32) for c, _ in requests]
    # fp32 like `Classifier.logits`: an answer must not move with what shares its batch
    with exact_fp32(), model_lock(first.model):
        pieces = logits_for_ids(first.model, ids, first.cfg.train.eval_batch_size, first.tokenizer.pad_token_id,
                                adapter_names=tags)
    return [run.pooled(pieces[start:start + n], owner, count) for run, (start, n, owner, count) in zip(runs_, parts)]


def mixing_refused(classifiers: list[Classifier], probe: list[str]) -> str:
    """Why texts for these runs (adapters of one peft model) cannot share a forward pass, or "" when they can:
    peft mixes LoRA adapters in a batch, and the probe texts' mixed logits must equal each run's own."""
    kinds = {str(runs.read_json(c.path / "adapter_config.json").get("peft_type")) for c in classifiers}
    if kinds != {"LORA"}:
        return f"peft mixes LoRA adapters in one batch, not {', '.join(sorted(kinds))}"
    requests = [(c, probe[i % len(probe):] + probe[:i % len(probe)]) for i, c in enumerate(classifiers)]
    try:
        mixed = mixed_logits(requests)
    except (TypeError, ValueError, RuntimeError) as e:  # a module peft cannot mix (its own message says which)
        return f"peft cannot mix these adapters in one batch: {str(e).splitlines()[0][:200]}"
    drift = max(float(np.abs(m - c.logits(t)).max()) for m, (c, t) in zip(mixed, requests))
    if drift > LOGIT_TOLERANCE:
        return f"mixed batches moved a logit by {drift:.1e} (tolerance {LOGIT_TOLERANCE:.0e})"
    return ""
