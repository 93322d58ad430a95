"""A finished run, loaded: its adapter reloaded from disk on its base model, and proved to reproduce the trained
model before anything uses it."""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.adapters.architectures import ModelNotFound, is_missing_folder
from budgetlora.adapters.model import load_tokenizer, load_trained
from budgetlora.config import Config
from budgetlora.config.use import LONG_TEXTS
from budgetlora.data.tokens import encode, windows
from budgetlora.errors import BudgetloraError, ConfigError, RunFolderError
from budgetlora.hardware import inference_dtype
from budgetlora.tasks import Task, class_names, task_of
from budgetlora.training.evaluate import exact_fp32, logits_for_ids

LOGIT_TOLERANCE = 1e-3
STRIDE_SHARE = 4  # long_texts chunk: consecutive windows share a quarter of their tokens


class VerificationError(BudgetloraError, RuntimeError):
    """The adapter reloaded from disk does not reproduce the predictions made at the end of training."""


class RunMetrics(dict):
    """A loaded run's metrics.json. A value it lacks, asked for by key, is a RunFolderError naming the file (a run
    folder damaged, or never finished), where a plain dict would end the command in a KeyError traceback."""

    def __init__(self, path: Path, values: dict | None = None):
        super().__init__(values or {})
        self.path, self.found = path, values is not None

    def __missing__(self, key):
        raise RunFolderError(f"{self.path} {f'has no {key!r}' if self.found else 'is missing'}")


def read_metrics(run: Path) -> RunMetrics:
    """metrics.json of a run folder; an absent one reads as empty, since loading the model needs none of it."""
    path = Path(run) / runs.METRICS
    return RunMetrics(path, runs.read_json(path) if path.is_file() else None)


@dataclass
class LoadedRun:
    path: Path
    cfg: Config
    model: object
    tokenizer: object
    # tokens read per text at prediction time; 0 = the trained model.max_length. Set it after load_run (the reload
    # check runs at the trained length); longer lets long target texts be read past the training cut
    max_length: int = 0
    # metrics.json, read once here: class names, temperature, training priors and the validation confusion matrix
    # all come from it, and nothing downstream opens the file again
    metrics: dict = field(default_factory=dict)
    # a text longer than read_length: "truncate" reads its start; "chunk" reads it all, as windows whose logits
    # are pooled by the task (tasks.Task.pool). Set it after load_run, as max_length
    long_texts: str = "truncate"
    # the peft adapter that is this run inside `model`: "default", or the run's id where one model holds several
    # runs on their shared base (`serve RUN RUN ...`)
    adapter: str = "default"

    @property
    def read_length(self) -> int:
        return self.max_length or self.cfg.model.max_length

    @property
    def task(self) -> Task:
        return task_of(self.cfg)

    @property
    def class_names(self) -> list[str]:
        return class_names(self.cfg, self.metrics.get("class_names"))

    def decide(self, logits: np.ndarray) -> np.ndarray:
        """The run's answers from its logits, by its task's rule at the settings it fitted on validation."""
        return self.task.decide(logits, self.task.settings(self.metrics, self.cfg.model.num_labels, self.path))

    def logits(self, texts: list[str], progress: bool = False, exact: bool = False) -> np.ndarray:
        """Logits under the run's precision on this machine (bf16 where it trained so and the hardware has it), or
        with `exact` in plain fp32, for the checks that compare against stored or merged logits."""
        dtype = None if exact else inference_dtype(self.cfg.train.precision, next(self.model.parameters()).device)
        ids, owner = self.token_rows(texts)
        with model_lock(self.model):
            self.activate()
            pieces = logits_for_ids(self.model, ids, self.cfg.train.eval_batch_size, self.tokenizer.pad_token_id,
                                    progress=progress, dtype=dtype)
        return self.pooled(pieces, owner, len(texts))

    def token_rows(self, texts: list[str]) -> tuple[list[list[int]], np.ndarray | None]:
        """The token ids the model reads for `texts`: one row per text (its first read_length tokens), or with
        long_texts chunk its windows, with the text each window belongs to."""
        if self.long_texts == "chunk":
            return windows(self.tokenizer, texts, self.read_length, self.read_length // STRIDE_SHARE)
        return encode(self.tokenizer, texts, self.read_length), None

    def pooled(self, pieces: np.ndarray, owner: np.ndarray | None, n: int) -> np.ndarray:
        """One row of logits per text from the rows of `token_rows`."""
        return pieces if owner is None else self.task.pool(pieces, owner, n)

    def activate(self) -> None:
        """Make this run's adapter the one `model` computes with (a no-op for a model holding one run). Hold
        `model_lock(self.model)` from here to the end of the forward pass: another run of the model may switch it."""
        if getattr(self.model, "active_adapter", self.adapter) != self.adapter:
            self.model.set_adapter(self.adapter, inference_mode=True)


_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_LOCK = threading.Lock()


def model_lock(model) -> threading.RLock:
    """One lock per model object: runs that are adapters of one model (`load_many`) take it around choosing their
    adapter and the forward pass, so that two threads never compute with each other's adapter."""
    with _LOCKS_LOCK:
        return _LOCKS.setdefault(model, threading.RLock())


def check_long_texts(value: str) -> str:
    """A `LoadedRun.long_texts` setting, checked: one line naming the choices otherwise."""
    if value not in LONG_TEXTS:
        raise ConfigError(f"long_texts must be one of {', '.join(LONG_TEXTS)}, got {value!r}")
    return value


# the peft methods whose adapters live side by side in one model without sharing anything; VeRA shares its random
# projections across adapters (one prng_key, the first adapter's rank), AdaLoRA reallocates ranks per model
SHAREABLE = ("LORA", "IA3", "LOHA", "LOKR")


def share_key(cfg: Config, adapter: dict, run: Path) -> tuple:
    """Runs with equal keys can be one peft model: the same base weights and tokenizer, the same head shape, and
    one peft method that keeps everything it trains to itself (`adapter`: the run's adapter_config.json). A run
    that trains the base's own biases (lora.bias) changes weights every adapter reads, so it gets a model of its own,
    as does any other method (`run` makes its key unique)."""
    own = adapter.get("peft_type") not in SHAREABLE or adapter.get("bias", "none") != "none"
    seed = cfg.train.seed if cfg.model.random_init else None  # a random-weight base is drawn from the run's seed
    return (cfg.model.name, cfg.model.tokenizer, cfg.model.num_labels, cfg.model.head, cfg.model.random_init, seed,
            adapter.get("peft_type"), str(run.resolve()) if own else "")


def load_run(run: str | Path, verify: bool = True, base: str | None = None, into: LoadedRun | None = None,
             adapter: str = "default") -> LoadedRun:
    """A run folder's model and tokenizer. `base`: where the run's base model lives now (a folder or hub id), for a
    run trained on a local folder that is elsewhere on this machine; its tokenizer is taken from there too.
    into: a loaded run with the same `share_key`, whose model takes this run's adapter as `adapter` (and whose
    tokenizer it shares), so that the base is held once."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run folder not found: {run}")
    cfg = runs.load_config(run)
    if base:
        cfg = cfg.replace(**{"model.name": str(base), "model.tokenizer": ""})
    elif is_missing_folder(cfg.model.name) or is_missing_folder(cfg.model.tokenizer):
        missing = cfg.model.name if is_missing_folder(cfg.model.name) else cfg.model.tokenizer
        raise ModelNotFound(f"{run} was trained on the model folder {missing}, which is not on this machine; "
                            "point the run at its base with --base PATH")
    metrics = read_metrics(run)
    if into is not None:
        model = load_trained(run, cfg, moved=bool(base), into=into.model, adapter_name=adapter)
        loaded = LoadedRun(run, cfg, model, into.tokenizer, metrics=metrics, adapter=adapter)
    else:
        loaded = LoadedRun(run, cfg, load_trained(run, cfg, moved=bool(base), adapter_name=adapter),
                           load_tokenizer(cfg), metrics=metrics, adapter=adapter)
    if verify:
        verify_reload(loaded)
    return loaded


def verify_reload(loaded: LoadedRun) -> float:
    """Re-score the stored validation sample in fp32; a drifted logit, or a changed label where the stored margin
    between the two best classes was wider than the tolerance, is an error. (A near-tie may flip on another
    device or library build without anything being wrong; a real mismatch moves logits far beyond it.)"""
    path = loaded.path / runs.VERIFY
    if not path.is_file():
        raise VerificationError(f"{loaded.path}: no {runs.VERIFY}; cannot check the reloaded adapter")
    try:
        ref = runs.read_json(path)
        expected = np.asarray(ref["logits"], dtype=np.float32)
        texts = [str(t) for t in ref["texts"]]
    except (ValueError, KeyError, TypeError):
        raise VerificationError(f"{path} is corrupt; cannot check the reloaded adapter") from None
    with exact_fp32():
        got = loaded.logits(texts, exact=True)
    if got.shape != expected.shape:
        raise VerificationError(f"reloaded adapter gives logits of shape {got.shape}, expected {expected.shape}")
    if not len(got):
        return 0.0
    top2 = np.sort(expected, axis=1)[:, -2:]
    decided = (top2[:, 1] - top2[:, 0]) > 2 * LOGIT_TOLERANCE  # each logit may move by the tolerance
    changed = int(((got.argmax(1) != expected.argmax(1)) & decided).sum())
    drift = float(np.abs(got - expected).max())
    if changed or drift > LOGIT_TOLERANCE:
        raise VerificationError(f"reloaded adapter disagrees with the trained model: {changed} of {len(got)} "
                                f"validation labels changed, max logit difference {drift:.2e} "
                                f"(tolerance {LOGIT_TOLERANCE:.0e})")
    return drift
