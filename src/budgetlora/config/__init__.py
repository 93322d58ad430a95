"""One frozen, typed config tree. It is at once the Python API, the YAML format and the CLI flags.

Every leaf field carries its help text in `metadata["help"]`; `add_flags` turns the tree into `--section.field`
argparse options and `from_flags` builds the config back, so a field added here appears everywhere at once. A field
with a fixed set of values declares them (`choices`), and its check, its error and its --help all read that one
declaration. Each section checks its own fields as it is built; `validate` holds the checks that need two sections.
The run id is a short hash of the canonical (sorted, defaults-filled) config, so the same config always maps to the
same run folder; `BASELINE_FIELDS` says which fields count at any value and which only away from their default.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from budgetlora.config import flags as _flags
from budgetlora.config.flags import build as _build, check, default_of, field_ as _f, set_dotted as _set_dotted
from budgetlora.config.sections import (
    LORA_ONLY,
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
    TrainConfig,
    VeraConfig,
)
from budgetlora.config.use import SelfTrainConfig, ServeConfig, SubmitConfig
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
                             "ia3; each has its own section", choices=tuple(METHOD_SECTIONS))
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
        d = _identity(self)
        canonical = json.dumps(d, sort_keys=True, separators=(",", ":"))
        return hashlib.sha1(canonical.encode()).hexdigest()[:10]


METHODS = tuple(METHOD_SECTIONS)  # each method's settings live in the section of its name
USE_SECTIONS = ("self_train", "submit", "serve")  # settings of the commands that use a run, not of its training
# never part of a run id: the run's label, how fast or in how much memory it trains (threads, micro-batches: the
# same updates, up to float rounding), and how a trained run is used
NOT_IDENTITY = ("name", "train.threads", "train.micro_batch", *USE_SECTIONS)

# The fields a run id counts at any value: the schema run ids were first published with (each method's section as it
# was when that method came). Written once, never edited: any field not named here counts only when set away from its
# default, so a field added with a default leaves every existing run id as it was, with no list to keep up to date.
# Outside it: `method` (so a lora run hashes as it did before there were methods) and the LoRA-only lora.init and
# lora.b_lr_ratio (another method refuses them away from their defaults, so they never count there).
BASELINE_FIELDS = frozenset(f"{section}.{name}" for section, names in {
    "model": "name tokenizer random_init num_labels max_length",
    "data": "train test val_fraction train_limit test_limit text_column label_column pseudo_labels unlabelled",
    "lora": "r alpha dropout targets layers bias rslora dora",
    "adalora": "init_r target_r tinit tfinal delta_t beta1 beta2 orth_reg_weight",
    "vera": "r d_initial prng_key",
    "loha": "r alpha rank_dropout module_dropout",
    "lokr": "r alpha decompose_both factor rank_dropout module_dropout",
    "ia3": "feedforward",
    "train": "epochs batch_size eval_batch_size lr optimizer schedule warmup weight_decay label_smoothing grad_clip "
             "precision eval_every patience group_by_length padding compile seed max_steps init_from",
    "augment": "synonym insert swap delete char_noise",
    "filter": "min_words max_words min_tokens max_tokens max_non_alnum dedup_exact dedup_near noisy_fraction",
    "budget": "max_params",
}.items() for name in names.split())


def _identity(cfg: Config) -> dict:
    """What makes two configs the same training, nested as in the config: never NOT_IDENTITY nor the settings of
    methods not in use; a BASELINE_FIELDS field at any value; any other field only away from its default."""
    unused_methods = [m for m in METHODS if m not in ("lora", cfg.method)]  # lora's targets and layers serve all
    left_out = tuple(f"{name}." for name in (*NOT_IDENTITY, *unused_methods))
    identity: dict = {}
    for key, default in _defaults(type(cfg)).items():
        value = functools.reduce(getattr, key.split("."), cfg)
        if f"{key}.".startswith(left_out) or (key not in BASELINE_FIELDS and value == default):
            continue
        *sections, leaf = key.split(".")
        node = identity
        for section in sections:
            node = node.setdefault(section, {})
        node[leaf] = value
    return identity


@functools.cache
def _defaults(cls) -> dict:
    """Every leaf's default under the dataclass `cls`, by dotted key ('train.lr' under Config, 'lr' under
    TrainConfig)."""
    return {key: default_of(f) for key, f, _ in _flags.leaves(cls)}


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
    """The checks that need two sections (each section checks its own fields as it is built)."""
    class_weight_list(cfg.train.class_weights, cfg.model.num_labels)
    check(cfg, "", [
        (not cfg.data.label_columns or cfg.model.problem_type == "multi",
         "data.label_columns applies to model.problem_type multi only (one 0/1 column per label)"),
        (not cfg.data.class_names or len(cfg.data.class_names) == cfg.model.num_labels,
         f"data.class_names names {len(cfg.data.class_names)} class(es) for {cfg.model.num_labels} "
         "(model.num_labels): one name per class"),
        (len(set(map(str, cfg.data.class_names))) == len(cfg.data.class_names), "data.class_names names a class twice"),
        *_method_rules(cfg),
        *(_multi_rules(cfg) if cfg.model.problem_type == "multi" else ()),
    ])


def _multi_rules(cfg: Config) -> list[tuple[bool, str]]:
    """Settings built on one class per row (class frequencies, softmax, one gold class) that a label set has no
    meaning for: refused rather than silently ignored."""
    columns = cfg.data.label_columns
    return [
        (cfg.data.label_delimiter.strip() != "", "data.label_delimiter must not be empty or blank"),
        (cfg.train.class_weights == "none", "train.class_weights applies to model.problem_type single only"),
        (cfg.train.loss == "ce", "train.loss focal applies to model.problem_type single only (multi trains on BCE)"),
        (cfg.train.label_smoothing == 0, "train.label_smoothing applies to model.problem_type single only"),
        (cfg.filter == type(cfg.filter)(), "filter settings apply to model.problem_type single only"),
        (not cfg.data.pseudo_labels, "data.pseudo_labels applies to model.problem_type single only"),
        (not columns or len(columns) == cfg.model.num_labels,
         f"data.label_columns names {len(columns)} column(s) for {cfg.model.num_labels} labels "
         "(model.num_labels): one column per label"),
        (len(set(map(str, columns))) == len(columns), "data.label_columns names a column twice"),
    ]


def _method_rules(cfg: Config) -> list[tuple[bool, str]]:
    """LoRA-only settings used with another method (silently ignored otherwise), and (IA)3's scaled inputs, which
    must be among the adapted modules; the method's name is checked against its declared choices, and each method's
    own section checks its values itself."""
    return [
        *((cfg.method == "lora" or getattr(cfg.lora, key) == _defaults(LoraConfig)[key],
           f"lora.{key} applies to method lora only, not to {cfg.method}") for key in LORA_ONLY),
        (cfg.method != "ia3" or all(str(t) in map(str, cfg.lora.targets) for t in cfg.ia3.feedforward),
         "ia3.feedforward must be a subset of lora.targets"),
    ]


# -- CLI -----------------------------------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser) -> None:
    """`--config FILE` and one `--section.field` flag per training config leaf, each with its help and default (the
    USE_SECTIONS get their own flags on their own commands: `flags.add_section_flags`)."""
    _flags.add_flags(parser, Config, skip=USE_SECTIONS)


def from_flags(args: argparse.Namespace) -> Config:
    return _flags.from_flags(args, Config)
