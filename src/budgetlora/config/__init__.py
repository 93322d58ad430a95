"""One frozen, typed config tree. It is at once the Python API, the YAML format and the CLI flags.

Every leaf field carries its help text in `metadata["help"]`; `add_flags` turns the tree into `--section.field`
argparse options and `from_flags` builds the config back, so a field added here appears everywhere at once.
The run id is a short hash of the canonical (sorted, defaults-filled) config, so the same config always maps to the
same run folder.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from budgetlora.config import flags as _flags
from budgetlora.config.flags import build as _build, field_ as _f, set_dotted as _set_dotted
from budgetlora.config.sections import (
    METHOD_SECTIONS,
    AdaLoraConfig,
    AugmentConfig,
    BudgetConfig,
    DataConfig,
    FilterConfig,
    Ia3Config,
    LohaConfig,
    LokrConfig,
    LoraConfig,
    ModelConfig,
    SelfTrainConfig,
    ServeConfig,
    SubmitConfig,
    TrainConfig,
    VeraConfig,
)
from budgetlora.errors import ConfigError


def preset_path(name: str | Path) -> Path | None:
    """A shipped preset by name ('minilm-quick', 'sweeps/minilm-mini'): configs/*.yaml of the checkout, installed as
    budgetlora/presets/ by the wheel. None when there is no such preset."""
    name = Path(name)
    if name.is_absolute() or ".." in name.parts:
        return None
    package = Path(__file__).resolve().parents[1]
    for folder in (package / "presets", package.parents[1] / "configs"):  # installed package; source checkout
        for cand in (folder / name, folder / f"{name}.yaml"):
            if cand.is_file():
                return cand
    return None


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    method: str = _f("lora", "adapter method: lora (with dora, rslora, init, b_lr_ratio), adalora, vera, loha, lokr, "
                             "ia3; each has its own section")
    lora: LoraConfig = field(default_factory=LoraConfig)
    adalora: AdaLoraConfig = field(default_factory=AdaLoraConfig)
    vera: VeraConfig = field(default_factory=VeraConfig)
    loha: LohaConfig = field(default_factory=LohaConfig)
    lokr: LokrConfig = field(default_factory=LokrConfig)
    ia3: Ia3Config = field(default_factory=Ia3Config)
    train: TrainConfig = field(default_factory=TrainConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    # how a trained run is used (USE_SECTIONS): read from the same YAML and flags, not part of the run id
    self_train: SelfTrainConfig = field(default_factory=SelfTrainConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    name: str = _f("", "a human label for the run (not part of the run id)")

    def __post_init__(self):
        validate(self)

    # -- serialisation -------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict | None) -> "Config":
        return _build(cls, d or {}, "")

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Config":
        path = Path(path)
        if not path.is_file():
            path = preset_path(path) or path
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            d = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
        if d is not None and not isinstance(d, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        return cls.from_dict(d)

    def replace(self, **overrides: Any) -> "Config":
        """Return a copy with dotted overrides applied, e.g. replace(**{"lora.r": 4})."""
        d = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(d, key, value)
        return Config.from_dict(d)

    @property
    def run_id(self) -> str:
        d = _identity(self.to_dict())
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(canonical.encode()).hexdigest()[:10]


METHODS = tuple(METHOD_SECTIONS)  # each method's settings live in the section of its name
_LORA_ONLY = {"init": "default", "b_lr_ratio": 1.0}  # lora fields that only the lora method reads
USE_SECTIONS = ("self_train", "submit", "serve")  # settings of the commands that use a run, not of its training
# train fields added after run ids were first published: at these values a config keeps the id it always had
_TRAIN_DEFAULTS = {"base_dropout": -1, "class_weights": "none", "loss": "ce", "focal_gamma": 2.0, "select": "loss",
                   "probe_steps": 0}
_ADDED_DEFAULTS = {"model": {"problem_type": "single", "head": "auto"},  # the same, other sections
                   "data": {"label_delimiter": ";", "label_columns": []}}


def _identity(d: dict) -> dict:
    """What makes two configs the same training: the name and the sections of methods not in use do not count, and
    a plain LoRA config (method lora, LoRA-only fields at their defaults) hashes as it did before methods existed.
    Nor do the USE_SECTIONS: serving or adapting a run never changes which training it was."""
    d = {k: v for k, v in d.items() if k not in USE_SECTIONS}
    d = {k: v for k, v in d.items() if k != "name" and not (k in METHODS and k not in ("lora", d["method"]))}
    # threads: how fast, not what is trained
    d["train"] = {k: v for k, v in d["train"].items()
                  if k != "threads" and not (k in _TRAIN_DEFAULTS and v == _TRAIN_DEFAULTS[k])}
    for section, defaults in _ADDED_DEFAULTS.items():
        d[section] = {k: v for k, v in d[section].items() if not (k in defaults and v == defaults[k])}
    if d["method"] == "lora":
        d.pop("method")
        d["lora"] = {k: v for k, v in d["lora"].items() if not (k in _LORA_ONLY and v == _LORA_ONLY[k])}
    else:
        d["lora"] = {k: v for k, v in d["lora"].items() if k not in _LORA_ONLY}
    return d


CHOICES = {
    "lora.bias": ("none", "lora_only", "all"),
    "train.optimizer": ("adamw", "rmsprop", "adagrad", "sgd"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.padding": ("auto", "longest", "buckets"),
    "lora.init": ("default", "gaussian", "pissa", "olora"),
    "train.loss": ("ce", "focal"),
    "train.select": ("loss", "accuracy", "macro_f1"),
    "model.problem_type": ("single", "multi"),
    "model.head": ("auto", "linear"),
}


def class_weight_list(spec: str, num_labels: int) -> list[float] | None:
    """train.class_weights as numbers when it lists them, checked against the class count; None for none and auto
    (auto is computed from the training rows, which only training knows)."""
    if spec in ("none", "auto"):
        return None
    try:
        values = [float(v) for v in spec.strip("[]").split(",")]  # a YAML list arrives as its string form
    except ValueError:
        raise ConfigError(f"train.class_weights must be none, auto or {num_labels} comma-separated numbers, "
                          f"got {spec!r}") from None
    if len(values) != num_labels:
        raise ConfigError(f"train.class_weights lists {len(values)} weights for {num_labels} classes "
                          f"(model.num_labels)")
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"train.class_weights must all be positive, got {spec!r}")
    return values


def validate(cfg: Config) -> None:
    for key, allowed in CHOICES.items():
        section, leaf = key.split(".")
        value = getattr(getattr(cfg, section), leaf)
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, got {value!r}")
    checks = [
        (cfg.lora.r >= 1, "lora.r must be >= 1"),
        (0 <= cfg.lora.dropout < 1, "lora.dropout must be in [0, 1)"),
        (len(cfg.lora.targets) > 0, "lora.targets must name at least one module"),
        (cfg.model.num_labels >= 2, "model.num_labels must be >= 2"),
        (cfg.model.max_length >= 8, "model.max_length must be >= 8"),
        (0 < cfg.data.val_fraction < 1, "data.val_fraction must be in (0, 1)"),
        (cfg.data.train_limit >= 0 and cfg.data.test_limit >= 0, "data limits must be >= 0"),
        (cfg.train.epochs > 0, "train.epochs must be > 0"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.eval_batch_size >= 0, "train.eval_batch_size must be >= 0 (0 = auto)"),
        (cfg.train.threads >= 0, "train.threads must be >= 0 (0 = auto)"),
        (cfg.train.probe_steps >= 0, "train.probe_steps must be >= 0 (0 = no linear probe)"),
        (cfg.train.base_dropout == -1 or 0 <= cfg.train.base_dropout < 1,
         "train.base_dropout must be -1 (the checkpoint's own) or in [0, 1)"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (0 <= cfg.train.warmup < 1, "train.warmup must be in [0, 1)"),
        (0 <= cfg.train.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (cfg.train.focal_gamma >= 0, "train.focal_gamma must be >= 0"),
        (cfg.train.loss == "focal" or cfg.train.focal_gamma == _TRAIN_DEFAULTS["focal_gamma"],
         "train.focal_gamma applies to train.loss focal only"),
        (cfg.train.loss == "ce" or cfg.train.label_smoothing == 0,
         "train.label_smoothing applies to train.loss ce only: focal loss already softens confident rows"),
        (cfg.budget.max_params > 0, "budget.max_params must be > 0"),
        (not cfg.data.label_columns or cfg.model.problem_type == "multi",
         "data.label_columns applies to model.problem_type multi only (one 0/1 column per label)"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    class_weight_list(cfg.train.class_weights, cfg.model.num_labels)
    _validate_method(cfg)
    if cfg.model.problem_type == "multi":
        _validate_multi(cfg)


def _validate_multi(cfg: Config) -> None:
    """Settings built on one class per row (class frequencies, softmax, one gold class) that a label set has no
    meaning for: refused rather than silently ignored."""
    checks = [
        (cfg.data.label_delimiter.strip() != "", "data.label_delimiter must not be empty or blank"),
        (cfg.train.class_weights == "none", "train.class_weights applies to model.problem_type single only"),
        (cfg.train.loss == "ce", "train.loss focal applies to model.problem_type single only (multi trains on BCE)"),
        (cfg.train.label_smoothing == 0, "train.label_smoothing applies to model.problem_type single only"),
        (cfg.filter == FilterConfig(), "filter settings apply to model.problem_type single only"),
        (not cfg.data.pseudo_labels, "data.pseudo_labels applies to model.problem_type single only"),
        (not cfg.data.label_columns or len(cfg.data.label_columns) == cfg.model.num_labels,
         f"data.label_columns names {len(cfg.data.label_columns)} column(s) for {cfg.model.num_labels} labels "
         "(model.num_labels): one column per label"),
        (len(set(map(str, cfg.data.label_columns))) == len(cfg.data.label_columns),
         "data.label_columns names a column twice"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


def _validate_method(cfg: Config) -> None:
    """The method's name, and LoRA-only settings used with another method (silently ignored otherwise); each
    method's own section checks its values itself."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    lc = cfg.lora
    if cfg.method != "lora":
        for key, default in (*_LORA_ONLY.items(), ("dora", False), ("rslora", False), ("bias", "none")):
            if getattr(lc, key) != default:
                raise ConfigError(f"lora.{key} applies to method lora only, not to {cfg.method}")
    checks = [
        (lc.b_lr_ratio > 0, "lora.b_lr_ratio must be > 0"),
        (not (lc.dora and lc.init in ("pissa", "olora")), "lora.init pissa/olora cannot be combined with lora.dora "
                                                          "(the saved adapter is converted to plain LoRA)"),
        (all(str(t) in map(str, lc.targets) for t in cfg.ia3.feedforward) or cfg.method != "ia3",
         "ia3.feedforward must be a subset of lora.targets"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


# -- CLI -----------------------------------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and one `--section.field` flag per training config leaf, each with its help and default (the
    USE_SECTIONS get their own flags on their own commands: `flags.add_section_flags`)."""
    _flags.add_flags(parser, Config, skip=USE_SECTIONS)


def from_flags(args: argparse.Namespace) -> Config:
    return _flags.from_flags(args, Config)
