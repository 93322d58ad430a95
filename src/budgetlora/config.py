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
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config that cannot be run: bad value, unknown key, over budget."""


def _f(default, help: str):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def preset_path(name: str | Path) -> Path | None:
    """A shipped preset by name ('minilm-quick', 'sweeps/minilm-mini'): configs/*.yaml of the checkout, installed as
    budgetlora/presets/ by the wheel. None when there is no such preset."""
    name = Path(name)
    if name.is_absolute() or ".." in name.parts:
        return None
    here = Path(__file__).resolve().parent
    for folder in (here / "presets", here.parents[1] / "configs"):  # installed package; source checkout
        for cand in (folder / name, folder / f"{name}.yaml"):
            if cand.is_file():
                return cand
    return None


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("minilm", "base model: 'minilm' (the embedded all-MiniLM-L6-v2), a hub id or a local folder")
    tokenizer: str = _f("", "tokenizer to use if not the model's own (a hub id, folder or 'minilm')")
    random_init: bool = _f(False, "build the architecture from its config with random weights (speed/param tests)")
    num_labels: int = _f(4, "number of classes")
    max_length: int = _f(128, "truncate texts to this many tokens")


@dataclass(frozen=True)
class DataConfig:
    train: str = _f("", "train source: a hub dataset name, a .csv/.csv.gz/.parquet/.pkl file, or '' for the default")
    test: str = _f("", "test source, same forms as train; '' for the default")
    val_fraction: float = _f(0.05, "stratified, seeded hold-out from train used for model selection")
    train_limit: int = _f(0, "keep a stratified sample of this many training rows (0 = all)")
    test_limit: int = _f(0, "keep a stratified sample of this many test rows (0 = all)")
    text_column: str = _f("text", "column holding the text")
    label_column: str = _f("label", "column holding the integer label")
    pseudo_labels: str = _f("", "CSV of pseudo-labelled rows (text,label written by self-train) added to train")
    unlabelled: str = _f("", "the unlabelled source the pseudo labels were predicted from (a record)")


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = _f(0.1, "dropout on the LoRA input")
    targets: list = _f(["q", "k", "v", "o", "ffn_in", "ffn_out"], "modules to adapt: short names q,k,v,o,ffn_in,ffn_out (or exact module suffixes)")
    layers: list = _f([], "layer indices to adapt (empty = all); negative counts from the top")
    bias: str = _f("none", "which biases train: none, lora_only, all")
    rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    dora: bool = _f(False, "weight-decomposed LoRA (adds one magnitude vector per module)")
    init: str = _f("default", "LoRA init: default (B = 0), gaussian, pissa (principal singular vectors of W; the "
                              "base keeps the residual), olora (QR of W); method lora only")
    b_lr_ratio: float = _f(1.0, "LoRA+: the B matrices learn at train.lr x this (1 = plain LoRA, 16 in the LoRA+ "
                                "paper); method lora only")


# -- one section per adapter method besides LoRA; lora.targets, lora.layers (and lora.dropout and lora.alpha where a
# method has an input dropout or a scale) say where and how every method adapts, so a method switch keeps targets
@dataclass(frozen=True)
class AdaLoraConfig:
    init_r: int = _f(12, "AdaLoRA: rank every module starts with (the budget counts this peak, not the final rank)")
    target_r: int = _f(8, "AdaLoRA: average rank per module left after pruning")
    tinit: float = _f(0.1, "AdaLoRA: share of the steps trained at init_r before pruning starts")
    tfinal: float = _f(0.2, "AdaLoRA: share of the last steps trained at the final ranks")
    delta_t: int = _f(10, "AdaLoRA: steps between two rank reallocations")
    beta1: float = _f(0.85, "AdaLoRA: EMA factor of the importance sensitivity")
    beta2: float = _f(0.85, "AdaLoRA: EMA factor of the importance uncertainty")
    orth_reg_weight: float = _f(0.5, "AdaLoRA: weight of the orthogonality penalty on A and B")


@dataclass(frozen=True)
class VeraConfig:
    r: int = _f(256, "VeRA rank of the shared frozen random matrices (the trained vectors grow by one per module "
                     "per rank)")
    d_initial: float = _f(0.1, "VeRA: initial value of the trained d vectors")
    prng_key: int = _f(0, "VeRA: seed of the shared frozen random matrices (saved with the adapter)")


@dataclass(frozen=True)
class LohaConfig:
    r: int = _f(8, "LoHa rank (each module trains two rank-r pairs: 2r(in + out))")
    alpha: float = _f(16.0, "LoHa alpha (scale = alpha / r)")
    rank_dropout: float = _f(0.0, "LoHa: dropout on the ranks during training")
    module_dropout: float = _f(0.0, "LoHa: probability of skipping a whole module during training")


@dataclass(frozen=True)
class LokrConfig:
    r: int = _f(8, "LoKr rank of the second Kronecker factor (a factor becomes full once r >= its larger side / 2)")
    alpha: float = _f(16.0, "LoKr alpha (scale = alpha / r)")
    decompose_both: bool = _f(False, "LoKr: also decompose the first Kronecker factor into rank r")
    factor: int = _f(-1, "LoKr: Kronecker factorisation divisor (-1 = near the square root of each dimension)")
    rank_dropout: float = _f(0.0, "LoKr: dropout on the ranks during training")
    module_dropout: float = _f(0.0, "LoKr: probability of skipping a whole module during training")


@dataclass(frozen=True)
class Ia3Config:
    feedforward: list = _f(["ffn_out"], "(IA)3: targets whose input (not output) is scaled, as for the FFN's second "
                                        "layer; each must be one of lora.targets")


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = _f(1.0, "passes over the training set (fractions allowed)")
    batch_size: int = _f(32, "training batch size")
    eval_batch_size: int = _f(0, "evaluation batch size; 0 = auto: 64 on a CPU (less padding, cache-sized), 512 on a GPU")
    lr: float = _f(2e-3, "peak learning rate")
    optimizer: str = _f("adamw", "adamw, rmsprop, adagrad or sgd (with momentum 0.9)")
    schedule: str = _f("linear", "linear, cosine or constant, after warmup")
    warmup: float = _f(0.06, "warmup as a fraction of all steps")
    weight_decay: float = _f(0.01, "decoupled weight decay (not applied to biases and norms)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0 = off)")
    precision: str = _f("auto", "auto (bf16 on a GPU that has it and on a CPU with native bf16 (AVX512-BF16 or "
                                "AMX), else fp32), fp32, bf16 or fp16; evaluation and prediction follow it")
    threads: int = _f(0, "CPU threads for torch (0 = the cores not already busy); not part of the run id")
    base_dropout: float = _f(-1.0, "dropout inside the frozen base while training (hidden states and attention); "
                                   "-1 keeps the checkpoint's own (0.1 for BERT types); 0 lets attention run as one "
                                   "fused kernel: faster steps and less memory")
    eval_every: int = _f(200, "evaluate on validation every N steps (0 = once per epoch)")
    patience: int = _f(0, "early stopping: evaluations without val-loss improvement before stopping (0 = off)")
    group_by_length: bool = _f(True, "batch texts of similar length together (less padding)")
    padding: str = _f("auto", "batch width: longest (each batch's longest row), buckets (a few fixed widths, so a GPU "
                              "reuses shapes and a CPU keeps fewer kernels in memory), auto (= buckets)")
    compile: bool = _f(False, "torch.compile the model for training (pays off on a GPU with padding=buckets)")
    seed: int = _f(42, "seed for splits, batches, dropout and init")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = no limit)")
    init_from: str = _f("", "start from this run folder's adapter weights (same model and LoRA setup)")


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time text edits, redrawn every epoch; each a probability, 0 disables it."""

    synonym: float = _f(0.0, "per-word probability of a WordNet synonym replacement")
    insert: float = _f(0.0, "per-word probability of inserting a synonym of a random word")
    swap: float = _f(0.0, "per-word probability of swapping with another position")
    delete: float = _f(0.0, "per-word probability of dropping the word")
    char_noise: float = _f(0.0, "per-character probability of a typo")

    def __post_init__(self):
        for f in dataclasses.fields(self):
            if not 0.0 <= getattr(self, f.name) <= 1.0:
                raise ConfigError(f"augment.{f.name} must be a probability in [0, 1], got {getattr(self, f.name)}")

    @property
    def enabled(self) -> bool:
        return any(getattr(self, f.name) > 0 for f in dataclasses.fields(self))

    @property
    def needs_wordnet(self) -> bool:
        return self.synonym > 0 or self.insert > 0


@dataclass(frozen=True)
class FilterConfig:
    """Training rows to drop before training; defaults keep everything. Filters run in field order."""

    min_words: int = _f(0, "drop training texts with fewer words (0 = off)")
    max_words: int = _f(0, "drop training texts with more words (0 = off)")
    min_tokens: int = _f(0, "drop training texts with fewer tokens (0 = off)")
    max_tokens: int = _f(0, "drop training texts with more tokens (0 = off)")
    max_non_alnum: float = _f(1.0, "drop texts whose share of non-alphanumeric characters is above this")
    dedup_exact: bool = _f(False, "drop exact duplicates (after lowercasing and whitespace folding)")
    dedup_near: float = _f(0.0, "drop near duplicates above this word-3-gram Jaccard similarity (0 = off)")
    noisy_fraction: float = _f(0.0, "drop this share of rows a first training pass finds least learnable (0 = off)")

    def __post_init__(self):
        for name in ("min_words", "max_words", "min_tokens", "max_tokens"):
            if getattr(self, name) < 0:
                raise ConfigError(f"filter.{name} must be >= 0")
        for name in ("max_non_alnum", "dedup_near"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"filter.{name} must be in [0, 1]")
        if not 0.0 <= self.noisy_fraction < 1.0:
            raise ConfigError("filter.noisy_fraction must be in [0, 1)")


@dataclass(frozen=True)
class BudgetConfig:
    max_params: int = _f(1_000_000, "hard limit on trainable parameters, head included")


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


METHODS = ("lora", "adalora", "vera", "loha", "lokr", "ia3")  # each method's settings live in the section of its name
_LORA_ONLY = {"init": "default", "b_lr_ratio": 1.0}  # lora fields that only the lora method reads


def _identity(d: dict) -> dict:
    """What makes two configs the same training: the name and the sections of methods not in use do not count, and
    a plain LoRA config (method lora, LoRA-only fields at their defaults) hashes as it did before methods existed."""
    d = {k: v for k, v in d.items() if k != "name" and not (k in METHODS and k not in ("lora", d["method"]))}
    # threads: how fast, not what is trained; base_dropout at its default (-1, the checkpoint's own): ids as before
    d["train"] = {k: v for k, v in d["train"].items() if k != "threads" and not (k == "base_dropout" and v == -1)}
    if d["method"] == "lora":
        d.pop("method")
        d["lora"] = {k: v for k, v in d["lora"].items() if not (k in _LORA_ONLY and v == _LORA_ONLY[k])}
    else:
        d["lora"] = {k: v for k, v in d["lora"].items() if k not in _LORA_ONLY}
    return d


def _set_dotted(d: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = d
    for p in parents:
        if not isinstance(node.get(p), dict):
            raise ConfigError(f"unknown config key: {key}")
        node = node[p]
    if leaf not in node:
        raise ConfigError(f"unknown config key: {key}")
    node[leaf] = value


def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _build(cls, d: dict, prefix: str):
    if not isinstance(d, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ConfigError(f"unknown config key(s): {', '.join(prefix + k for k in sorted(unknown))}")
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            continue
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            kwargs[f.name] = _build(t, d[f.name] or {}, prefix + f.name + ".")
        else:
            kwargs[f.name] = _coerce(d[f.name], t, prefix + f.name)
    return cls(**kwargs)


def parse_bool(value: str) -> bool:
    """'true/yes/on/1' or 'false/no/off/0', any case; ValueError otherwise."""
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {value!r}")


def _coerce(value: Any, t, key: str):
    """Turn YAML or CLI strings into the field's type, with one clear error when impossible."""
    try:
        if t is bool:
            return parse_bool(value) if isinstance(value, str) else bool(value)
        if t is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
        if t is float:
            if not math.isfinite(float(value)):  # nan or inf would train to chance accuracy
                raise ValueError
            return float(value)
        if t is str:
            return "" if value is None else str(value)
        if t is list or typing.get_origin(t) is list:
            if value is None:
                return []
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            items = list(value)
            # layers are integers, targets strings: keep YAML's own types, convert numeric strings
            return [int(v) if isinstance(v, str) and v.lstrip("-").isdigit() else v for v in items]
    except (TypeError, ValueError):
        pass
    else:
        return value
    raise ConfigError(f"{key}: cannot read {value!r} as {getattr(t, '__name__', t)}")


CHOICES = {
    "lora.bias": ("none", "lora_only", "all"),
    "train.optimizer": ("adamw", "rmsprop", "adagrad", "sgd"),
    "train.schedule": ("linear", "cosine", "constant"),
    "train.precision": ("auto", "fp32", "bf16", "fp16"),
    "train.padding": ("auto", "longest", "buckets"),
    "lora.init": ("default", "gaussian", "pissa", "olora"),
}


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
        (cfg.train.base_dropout == -1 or 0 <= cfg.train.base_dropout < 1,
         "train.base_dropout must be -1 (the checkpoint's own) or in [0, 1)"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (0 <= cfg.train.warmup < 1, "train.warmup must be in [0, 1)"),
        (0 <= cfg.train.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
        (cfg.budget.max_params > 0, "budget.max_params must be > 0"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)
    _validate_method(cfg)


def _validate_method(cfg: Config) -> None:
    """The chosen method's section, and LoRA-only settings used with another method (silently ignored otherwise)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method must be one of {', '.join(METHODS)}, got {cfg.method!r}")
    lc, ad = cfg.lora, cfg.adalora
    if cfg.method != "lora":
        for key, default in (*_LORA_ONLY.items(), ("dora", False), ("rslora", False), ("bias", "none")):
            if getattr(lc, key) != default:
                raise ConfigError(f"lora.{key} applies to method lora only, not to {cfg.method}")
    checks = [
        (lc.b_lr_ratio > 0, "lora.b_lr_ratio must be > 0"),
        (not (lc.dora and lc.init in ("pissa", "olora")), "lora.init pissa/olora cannot be combined with lora.dora "
                                                          "(the saved adapter is converted to plain LoRA)"),
        (1 <= ad.target_r <= ad.init_r, "adalora needs 1 <= target_r <= init_r"),
        (0 <= ad.tinit and 0 <= ad.tfinal and ad.tinit + ad.tfinal < 1, "adalora.tinit + adalora.tfinal must be "
                                                                         "in [0, 1): the rest is the pruning phase"),
        (ad.delta_t >= 1, "adalora.delta_t must be >= 1"),
        (0 <= ad.beta1 < 1 and 0 <= ad.beta2 < 1, "adalora.beta1 and beta2 must be in [0, 1)"),
        (ad.orth_reg_weight >= 0, "adalora.orth_reg_weight must be >= 0"),
        (cfg.vera.r >= 1, "vera.r must be >= 1"),
        (cfg.loha.r >= 1 and cfg.lokr.r >= 1, "loha.r and lokr.r must be >= 1"),
        (cfg.lokr.factor == -1 or cfg.lokr.factor >= 1, "lokr.factor must be -1 or >= 1"),
        (all(0 <= x < 1 for x in (cfg.loha.rank_dropout, cfg.loha.module_dropout, cfg.lokr.rank_dropout,
                                  cfg.lokr.module_dropout)), "loha/lokr dropouts must be in [0, 1)"),
        (all(str(t) in map(str, lc.targets) for t in cfg.ia3.feedforward) or cfg.method != "ia3",
         "ia3.feedforward must be a subset of lora.targets"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ConfigError(msg)


# -- CLI -----------------------------------------------------------------------------------------------------------
def _leaves(cls=Config, prefix=""):
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if dataclasses.is_dataclass(t):
            yield from _leaves(t, prefix + f.name + ".")
        else:
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            yield prefix + f.name, t, default, f.metadata.get("help", "")


def add_flags(parser: argparse.ArgumentParser) -> None:
    """Add `--config FILE` and one `--section.field` flag per config leaf, each with its help and default."""
    parser.add_argument("--config", help="YAML config file, or a shipped preset by name: minilm-default, "
                                         "minilm-quick, roberta-m3, ... (flags override it)")
    group = parser.add_argument_group("config fields (override the YAML)")
    for key, t, default, help in _leaves():
        kind = "list" if (t is list or typing.get_origin(t) is list) else getattr(t, "__name__", str(t))
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        group.add_argument(f"--{key}", dest=f"cfg:{key}", default=None, metavar=kind.upper(),
                           help=f"{help} (default: {shown})")


def from_flags(args: argparse.Namespace) -> Config:
    base = Config.from_yaml(args.config) if getattr(args, "config", None) else Config()
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:") and v is not None}
    return base.replace(**overrides) if overrides else base
