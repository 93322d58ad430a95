"""The sections of the config tree, one frozen dataclass each; every field carries its help text (and, for a fixed
set of values, those values). Each section checks its own fields as it is built; checks that need two sections are
the whole config's (`config.validate`)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from budgetlora.config.flags import check, field_ as _f


@dataclass(frozen=True)
class ModelConfig:
    name: str = _f("minilm", "base model: 'minilm' (the embedded all-MiniLM-L6-v2), a hub id or a local folder")
    tokenizer: str = _f("", "tokenizer to use if not the model's own (a hub id, folder or 'minilm')")
    random_init: bool = _f(False, "build the architecture from its config with random weights (speed/param tests)")
    num_labels: int = _f(4, "number of classes")
    max_length: int = _f(128, "truncate texts to this many tokens")
    problem_type: str = _f("single", "single (one class per text) or multi (a set of labels per text, sigmoid + BCE)",
                           choices=("single", "multi"))
    head: str = _f("auto", "classification head: auto (the architecture's own; RoBERTa and MPNet: dense 768x768 + "
                           "out_proj, 593,668 params at 4 classes) or linear (one Linear on the first token's final "
                           "state, 3,076 params: the freed budget goes to the adapters)", choices=("auto", "linear"))

    def __post_init__(self):
        check(self, "model", [
            (self.num_labels >= 2, "model.num_labels must be >= 2"),
            (self.max_length >= 8, "model.max_length must be >= 8"),
        ])


@dataclass(frozen=True)
class DataConfig:
    train: str = _f("", "train source: a hub dataset name, a .csv/.csv.gz/.parquet/.pkl file, or '' for the default")
    test: str = _f("", "test source, same forms as train; '' for the default")
    val_fraction: float = _f(0.05, "stratified, seeded hold-out from train used for model selection")
    train_limit: int = _f(0, "keep a stratified sample of this many training rows (0 = all)")
    test_limit: int = _f(0, "keep a stratified sample of this many test rows (0 = all)")
    text_column: str = _f("text", "column holding the text")
    label_column: str = _f("label", "column holding the integer label")
    label_delimiter: str = _f(";", "model.problem_type multi: separator of the label ids in one cell ('0;2')")
    label_columns: list = _f([], "model.problem_type multi: one 0/1 column per label, in label-id order, read "
                                 "instead of label_column; their names become the class names (empty = off)")
    class_names: list = _f([], "the classes' names in label-id order, for the card, --proba columns and serve "
                               "(empty: a multi-label run's label columns, AG News's on the default data, else the ids)")
    pseudo_labels: str = _f("", "CSV of pseudo-labelled rows (text,label written by self-train) added to train")
    unlabelled: str = _f("", "the unlabelled source the pseudo labels were predicted from (a record)")

    def __post_init__(self):
        check(self, "data", [
            (0 < self.val_fraction < 1, "data.val_fraction must be in (0, 1)"),
            (self.train_limit >= 0 and self.test_limit >= 0, "data limits must be >= 0"),
        ])


@dataclass(frozen=True)
class LoraConfig:
    r: int = _f(8, "LoRA rank")
    alpha: float = _f(16.0, "LoRA alpha (scale = alpha / r, or alpha / sqrt(r) with rslora)")
    dropout: float = _f(0.1, "dropout on the LoRA input")
    targets: list = _f(["q", "k", "v", "o", "ffn_in", "ffn_out"], "modules to adapt: short names q,k,v,o,ffn_in,ffn_out (or exact module suffixes)")
    layers: list = _f([], "layer indices to adapt (empty = all); negative counts from the top")
    bias: str = _f("none", "which biases train: none, lora_only, all", choices=("none", "lora_only", "all"))
    rslora: bool = _f(False, "rank-stabilised scaling alpha / sqrt(r)")
    dora: bool = _f(False, "weight-decomposed LoRA (adds one magnitude vector per module)")
    init: str = _f("default", "LoRA init: default (B = 0), gaussian, pissa (principal singular vectors of W; the "
                              "base keeps the residual), olora (QR of W); method lora only",
                   choices=("default", "gaussian", "pissa", "olora"))
    b_lr_ratio: float = _f(1.0, "LoRA+: the B matrices learn at train.lr x this (1 = plain LoRA, 16 in the LoRA+ "
                                "paper); method lora only")

    def __post_init__(self):
        check(self, "lora", [
            (self.r >= 1, "lora.r must be >= 1"),
            (0 <= self.dropout < 1, "lora.dropout must be in [0, 1)"),
            (len(self.targets) > 0, "lora.targets must name at least one module"),
            (self.b_lr_ratio > 0, "lora.b_lr_ratio must be > 0"),
            (not (self.dora and self.init in ("pissa", "olora")),
             "lora.init pissa/olora cannot be combined with lora.dora (the saved adapter is converted to plain LoRA)"),
        ])


# the lora fields only the lora method reads: another method refuses them away from their defaults
LORA_ONLY = ("init", "b_lr_ratio", "dora", "rslora", "bias")


# -- one section per adapter method besides LoRA; lora.targets, lora.layers (and lora.dropout and lora.alpha where a
# method has an input dropout or a scale) say where and how every method adapts, so a method switch keeps targets.
# Each section checks its own values; METHOD_SECTIONS below names every method.

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

    def __post_init__(self):
        check(self, "adalora", [
            (1 <= self.target_r <= self.init_r, "adalora needs 1 <= target_r <= init_r"),
            (0 <= self.tinit and 0 <= self.tfinal and self.tinit + self.tfinal < 1,
             "adalora.tinit + adalora.tfinal must be in [0, 1): the rest is the pruning phase"),
            (self.delta_t >= 1, "adalora.delta_t must be >= 1"),
            (0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "adalora.beta1 and beta2 must be in [0, 1)"),
            (self.orth_reg_weight >= 0, "adalora.orth_reg_weight must be >= 0"),
        ])


@dataclass(frozen=True)
class VeraConfig:
    r: int = _f(256, "VeRA rank of the shared frozen random matrices (the trained vectors grow by one per module "
                     "per rank)")
    d_initial: float = _f(0.1, "VeRA: initial value of the trained d vectors")
    prng_key: int = _f(0, "VeRA: seed of the shared frozen random matrices (saved with the adapter)")

    def __post_init__(self):
        check(self, "vera", [(self.r >= 1, "vera.r must be >= 1")])


@dataclass(frozen=True)
class LohaConfig:
    r: int = _f(8, "LoHa rank (each module trains two rank-r pairs: 2r(in + out))")
    alpha: float = _f(16.0, "LoHa alpha (scale = alpha / r)")
    rank_dropout: float = _f(0.0, "LoHa: dropout on the ranks during training")
    module_dropout: float = _f(0.0, "LoHa: probability of skipping a whole module during training")

    def __post_init__(self):
        check(self, "loha", [
            (self.r >= 1, "loha.r must be >= 1"),
            (0 <= self.rank_dropout < 1 and 0 <= self.module_dropout < 1, "loha dropouts must be in [0, 1)"),
        ])


@dataclass(frozen=True)
class LokrConfig:
    r: int = _f(8, "LoKr rank of the second Kronecker factor (a factor becomes full once r >= its larger side / 2)")
    alpha: float = _f(16.0, "LoKr alpha (scale = alpha / r)")
    decompose_both: bool = _f(False, "LoKr: also decompose the first Kronecker factor into rank r")
    factor: int = _f(-1, "LoKr: Kronecker factorisation divisor (-1 = near the square root of each dimension)")
    rank_dropout: float = _f(0.0, "LoKr: dropout on the ranks during training")
    module_dropout: float = _f(0.0, "LoKr: probability of skipping a whole module during training")

    def __post_init__(self):
        check(self, "lokr", [
            (self.r >= 1, "lokr.r must be >= 1"),
            (self.factor == -1 or self.factor >= 1, "lokr.factor must be -1 or >= 1"),
            (0 <= self.rank_dropout < 1 and 0 <= self.module_dropout < 1, "lokr dropouts must be in [0, 1)"),
        ])


@dataclass(frozen=True)
class Ia3Config:
    feedforward: list = _f(["ffn_out"], "(IA)3: targets whose input (not output) is scaled, as for the FFN's second "
                                        "layer; each must be one of lora.targets")


# every adapter method by its `method` name, which is also the name of its section in the config tree; the method
# names the config accepts come from here, and adapters.methods holds one record for each
METHOD_SECTIONS: dict[str, type] = {"lora": LoraConfig, "adalora": AdaLoraConfig, "vera": VeraConfig,
                                    "loha": LohaConfig, "lokr": LokrConfig, "ia3": Ia3Config}


@dataclass(frozen=True)
class TrainConfig:
    epochs: float = _f(1.0, "passes over the training set (fractions allowed)")
    batch_size: int = _f(32, "training batch size")
    micro_batch: int = _f(0, "forward and backward this many rows of a batch at a time, their gradients summed into "
                             "the batch's one step: the same update in a fraction of the activation memory (0 = the "
                             "whole batch); not part of the run id")
    eval_batch_size: int = _f(0, "evaluation batch size; 0 = auto: 64 on a CPU (less padding, cache-sized), 512 on a GPU")
    lr: float = _f(2e-3, "peak learning rate")
    optimizer: str = _f("adamw", "adamw, rmsprop, adagrad or sgd (with momentum 0.9)",
                        choices=("adamw", "rmsprop", "adagrad", "sgd"))
    schedule: str = _f("linear", "linear, cosine or constant, after warmup", choices=("linear", "cosine", "constant"))
    warmup: float = _f(0.06, "warmup as a fraction of all steps")
    weight_decay: float = _f(0.01, "decoupled weight decay (not applied to biases and norms)")
    label_smoothing: float = _f(0.0, "label smoothing of the cross-entropy loss")
    class_weights: str = _f("none", "per-class loss weights: none, auto (inverse training class frequency, mean 1) "
                                    "or one positive number per class ('1,2,4,8')")
    loss: str = _f("ce", "training loss: ce (cross-entropy) or focal ((1 - p)^focal_gamma x CE, class weights as "
                         "alpha)", choices=("ce", "focal"))
    focal_gamma: float = _f(2.0, "focal loss exponent (0 = plain cross-entropy); loss focal only")
    grad_clip: float = _f(1.0, "clip the gradient norm to this (0 = off)")
    precision: str = _f("auto", "auto (bf16 on a GPU that has it and on a CPU with native bf16 (AVX512-BF16 or "
                                "AMX), else fp32), fp32, bf16 or fp16; evaluation and prediction follow it",
                        choices=("auto", "fp32", "bf16", "fp16"))
    threads: int = _f(0, "CPU threads for torch (0 = the cores not already busy); not part of the run id")
    base_dropout: float = _f(-1.0, "dropout inside the frozen base while training (hidden states and attention); "
                                   "-1 keeps the checkpoint's own (0.1 for BERT types); 0 lets attention run as one "
                                   "fused kernel: faster steps and less memory")
    eval_every: int = _f(200, "evaluate on validation every N steps (0 = once per epoch)")
    patience: int = _f(0, "early stopping: evaluations without improvement of train.select before stopping "
                          "(0 = off)")
    select: str = _f("loss", "validation metric that picks the kept state and drives patience: loss (lower is "
                             "better), accuracy or macro_f1", choices=("loss", "accuracy", "macro_f1"))
    group_by_length: bool = _f(True, "batch texts of similar length together (less padding)")
    padding: str = _f("auto", "batch width: longest (each batch's longest row), buckets (a few fixed widths, so a GPU "
                              "reuses shapes and a CPU keeps fewer kernels in memory), auto (= buckets)",
                      choices=("auto", "longest", "buckets"))
    compile: bool = _f(False, "torch.compile the model for training (pays off on a GPU with padding=buckets)")
    seed: int = _f(42, "seed for splits, batches, dropout and init")
    max_steps: int = _f(0, "stop after this many optimizer steps (0 = no limit)")
    max_time: float = _f(0.0, "stop training after this many seconds, validating once more where it stops "
                              "(0 = no limit); a run cut by it depends on the machine's speed")
    probe_steps: int = _f(0, "train the head alone for this many steps first (a linear probe, LP-FT), then the "
                             "adapters with it; not counted in epochs or max_steps (0 = off)")
    init_from: str = _f("", "start from this run folder's adapter weights (same model and LoRA setup)")

    def __post_init__(self):
        check(self, "train", [
            (self.epochs > 0, "train.epochs must be > 0"),
            (self.batch_size >= 1, "train.batch_size must be >= 1"),
            (self.eval_batch_size >= 0, "train.eval_batch_size must be >= 0 (0 = auto)"),
            (self.threads >= 0, "train.threads must be >= 0 (0 = auto)"),
            (self.micro_batch >= 0, "train.micro_batch must be >= 0 (0 = the whole batch at once)"),
            (self.max_time >= 0, "train.max_time must be >= 0 seconds (0 = no limit)"),
            (self.probe_steps >= 0, "train.probe_steps must be >= 0 (0 = no linear probe)"),
            (self.base_dropout == -1 or 0 <= self.base_dropout < 1,
             "train.base_dropout must be -1 (the checkpoint's own) or in [0, 1)"),
            (self.lr > 0, "train.lr must be > 0"),
            (0 <= self.warmup < 1, "train.warmup must be in [0, 1)"),
            (0 <= self.label_smoothing < 1, "train.label_smoothing must be in [0, 1)"),
            (self.focal_gamma >= 0, "train.focal_gamma must be >= 0"),
            (self.loss == "focal" or self.focal_gamma == TrainConfig.focal_gamma,  # the class attribute: its default
             "train.focal_gamma applies to train.loss focal only"),
            (self.loss == "ce" or self.label_smoothing == 0,
             "train.label_smoothing applies to train.loss ce only: focal loss already softens confident rows"),
        ])


@dataclass(frozen=True)
class AugmentConfig:
    """Train-time text edits, redrawn every epoch; each a probability, 0 disables it."""

    synonym: float = _f(0.0, "per-word probability of a WordNet synonym replacement")
    insert: float = _f(0.0, "per-word probability of inserting a synonym of a random word")
    swap: float = _f(0.0, "per-word probability of swapping with another position")
    delete: float = _f(0.0, "per-word probability of dropping the word")
    char_noise: float = _f(0.0, "per-character probability of a typo")

    def __post_init__(self):
        check(self, "augment", [(0.0 <= getattr(self, f.name) <= 1.0,
                                 f"augment.{f.name} must be a probability in [0, 1], got {getattr(self, f.name)}")
                                for f in dataclasses.fields(self)])

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
        check(self, "filter", [
            *((getattr(self, name) >= 0, f"filter.{name} must be >= 0")
              for name in ("min_words", "max_words", "min_tokens", "max_tokens")),
            *((0.0 <= getattr(self, name) <= 1.0, f"filter.{name} must be in [0, 1]")
              for name in ("max_non_alnum", "dedup_near")),
            (0.0 <= self.noisy_fraction < 1.0, "filter.noisy_fraction must be in [0, 1)"),
        ])


@dataclass(frozen=True)
class BudgetConfig:
    max_params: int = _f(1_000_000, "hard limit on trainable parameters, head included")

    def __post_init__(self):
        check(self, "budget", [(self.max_params > 0, "budget.max_params must be > 0")])
