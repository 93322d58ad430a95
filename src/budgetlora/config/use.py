"""The settings of the commands that use a run rather than train one (`serve`, `self-train`, `submit`): sections of
the same config tree, read from the same YAML and flags, never part of the run id (the same training serves,
self-trains and submits under any of them)."""
from __future__ import annotations

from dataclasses import dataclass

from budgetlora.config.flags import check, field_ as _f

LONG_TEXTS = ("truncate", "chunk")  # how a text longer than the model reads is read: its start, or every window
PRIOR_CORRECTION = ("off", "auto", "on")  # off: argmax; auto: where the shift analysis' gate applies it; on: always



@dataclass(frozen=True)
class ServeConfig:
    """`budgetlora serve`: where it listens and how much one request and one forward pass may hold."""

    host: str = _f("127.0.0.1", "address to listen on")
    port: int = _f(8000, "port to listen on")
    max_batch: int = _f(64, "texts per forward pass when merging requests")
    max_texts: int = _f(256, "texts per request")
    max_chars: int = _f(10_000, "characters per text")
    max_body_bytes: int = _f(0, "larger request bodies get 413 (0 = enough for max_texts texts of max_chars)")
    batch_wait_ms: float = _f(2.0, "how long a forward pass waits for more requests to merge")
    show_paths: bool = _f(False, "GET /info shows the run's and base model's full paths on this server, not only "
                                 "their names")
    backend: str = _f("torch", "torch, or onnx: serve an `export --onnx` folder (or a run folder holding one in "
                               "onnx/) on onnxruntime, without torch", choices=("torch", "onnx"))

    def __post_init__(self):
        check(self, "serve", [
            (bool(self.host), "serve.host must name an address"),
            (0 <= self.port <= 65535, "serve.port must be in 0..65535"),
            (self.max_batch >= 1, "serve.max_batch must be >= 1"),
            (self.max_texts >= 1, "serve.max_texts must be >= 1"),
            (self.max_chars >= 1, "serve.max_chars must be >= 1"),
            (self.max_body_bytes >= 0,
             "serve.max_body_bytes must be >= 0 (0 = derived from max_texts and max_chars)"),
            (self.batch_wait_ms >= 0, "serve.batch_wait_ms must be >= 0"),
        ])

    @property
    def body_limit(self) -> int:
        """Request body bytes accepted: max_body_bytes, or room for max_texts texts of max_chars characters (UTF-8
        takes up to 4 bytes a character) plus the JSON around them."""
        return self.max_body_bytes or self.max_texts * (4 * self.max_chars + 8) + 4096

    @property
    def limits(self) -> dict:
        return {"max_batch": self.max_batch, "max_texts": self.max_texts, "max_chars": self.max_chars,
                "max_body_bytes": self.body_limit, "batch_wait_ms": self.batch_wait_ms}


@dataclass(frozen=True)
class SelfTrainConfig:
    """`budgetlora self-train`: which unlabelled texts get pseudo labels, and how the new runs train on them."""

    rounds: int = _f(1, "self-training rounds, each from the previous round's run")
    threshold: float = _f(-1.0, "minimum predicted probability to pseudo-label (-1 = 0.9, or 0 with share)")
    share: float = _f(0.0, "pseudo-label each predicted class's most confident share of rows, e.g. 0.3 (0 = off)")
    mix: float = _f(0.0, "repeat pseudo rows to about this share of the training rows, e.g. 0.3 (0 = as they come)")
    max_val_drop: float = _f(1.0, "refuse a round whose validation accuracy falls more than this below its "
                                  "parent's, and stop there (1 = keep every round)")
    balance: bool = _f(True, "same number of pseudo labels per predicted class, most confident first")
    max_per_class: int = _f(0, "at most this many pseudo labels per class (0 = no cap)")
    prior_correction: str = _f("off", "pseudo-label from prior-corrected posteriors: off, on, or auto (each round "
                                      "runs the shift analysis and corrects only where its gate applies)",
                               choices=PRIOR_CORRECTION)
    target_prior: str = _f("", "pseudo-label from posteriors fitted to this known class mix ('uniform' or one share "
                               "per class), so a round cannot learn the skew it should remove ('' = off)")
    epochs: float = _f(0.0, "train.epochs of the new runs (0 = the parent's)")
    max_steps: int = _f(-1, "train.max_steps of the new runs (-1 = the parent's, 0 = no limit)")
    lr: float = _f(0.0, "train.lr of the new runs (0 = the parent's)")

    def __post_init__(self):
        check(self, "self_train", [
            (not (self.target_prior and self.prior_correction != "off"),
             "self_train.give target_prior (a known class mix) or prior_correction (an estimated one), not both"),
            (self.rounds >= 1, "self_train.rounds must be >= 1"),
            (self.threshold == -1 or 0 <= self.threshold <= 1,
             "self_train.threshold must be in [0, 1] (or -1: the default)"),
            (0 <= self.share <= 1, f"self_train.share must be in [0, 1], got {self.share}"),
            (0 <= self.mix < 1, f"self_train.mix must be in [0, 1), got {self.mix}"),
            (-1 <= self.max_val_drop <= 1, "self_train.max_val_drop must be in [-1, 1] (1 = keep every round)"),
            (self.max_per_class >= 0, "self_train.max_per_class must be >= 0"),
            (self.epochs >= 0 and self.lr >= 0, "self_train.epochs and lr must be >= 0 (0 = the parent's)"),
            (self.max_steps >= -1, "self_train.max_steps must be >= -1 (-1 = the parent's)"),
        ])

    @property
    def min_confidence(self) -> float:
        """The threshold in force: with a share, each class's top rows are taken whatever their confidence."""
        return self.threshold if self.threshold >= 0 else (0.0 if self.share else 0.9)

    @property
    def overrides(self) -> dict:
        """The training settings the new runs change from their parent's (dotted config keys)."""
        return {k: v for k, v, keep in (("train.epochs", self.epochs, self.epochs > 0),
                                        ("train.max_steps", self.max_steps, self.max_steps >= 0),
                                        ("train.lr", self.lr, self.lr > 0)) if keep}


@dataclass(frozen=True)
class SubmitConfig:
    """`budgetlora submit`: how the trained run is adapted to the target file before it is labelled."""

    rounds: int = _f(0, "self-training rounds on the target texts, each kept only if validation holds (default 0: "
                        "one round cost 0.75-0.9 points on two of three text shifts in benchmarks/shift_suite.py)")
    share: float = _f(0.3, "self-training: top share of each predicted class")
    mix: float = _f(0.25, "self-training: pseudo rows' share of the training rows")
    steps: int = _f(300, "self-training: optimizer steps per round")
    lr: float = _f(5e-4, "self-training: learning rate of a round", flag="st-lr")
    max_val_drop: float = _f(0.005, "self-training round gate: largest validation accuracy loss a kept round may have")
    prior_correction: str = _f("auto", "off, on, or auto: only where EM and BBSE agree and the texts did not move",
                               choices=PRIOR_CORRECTION)
    max_length: int = _f(0, "tokens read per target text (0 = model.max_length)")
    target_prior: str = _f("", "the target's class mix when it is known: 'uniform' or one share per class "
                               "('0.4,0.2,0.2,0.2'); the target's posteriors are fitted to it, instead of prior "
                               "correction ('' = not known)")

    def __post_init__(self):
        check(self, "submit", [
            (self.rounds >= 0, "submit.rounds must be >= 0"),
            (0 < self.share <= 1, f"submit.share must be in (0, 1], got {self.share}"),
            (0 <= self.mix < 1, f"submit.mix must be in [0, 1), got {self.mix}"),
            (self.steps >= 1, "submit.steps must be >= 1"),
            (self.lr > 0, "submit.lr must be > 0"),
            (-1 <= self.max_val_drop <= 1, "submit.max_val_drop must be in [-1, 1]"),
            (self.max_length >= 0, "submit.max_length must be >= 0 (0 = model.max_length)"),
        ])

    def self_training(self) -> SelfTrainConfig:
        """The rounds as `self-train` runs them: each class's top share whatever its confidence, a fixed number of
        steps at a round's own learning rate."""
        return SelfTrainConfig(rounds=max(self.rounds, 1), threshold=0.0, share=self.share, mix=self.mix,
                               max_val_drop=self.max_val_drop, max_steps=self.steps, lr=self.lr,
                               target_prior=self.target_prior)
