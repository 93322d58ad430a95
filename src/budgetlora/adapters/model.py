"""Base model + adapter (peft: LoRA or another method, see `methods`) + a fully trained head, built from a config;
and loading a saved run back."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from budgetlora.adapters import attention, budget, methods
from budgetlora.adapters.architectures import (
    LAST_TOKEN_POOLING,
    load_model_config,
    quiet,
    resolve_name,
    shape_head,
)
from budgetlora.config import Config
from budgetlora.errors import BudgetloraError
from budgetlora.runs import ADAPTER_FILES


class AdapterError(BudgetloraError, ValueError):
    """A saved adapter that cannot be loaded onto the configured base model."""


class TokenizerError(BudgetloraError, ValueError):
    """A tokenizer the model cannot be batched with."""


def load_tokenizer(cfg: Config):
    """The run's tokenizer; one without a padding token (GPT-2's, Llama's) pads with its end-of-text token, and
    `with_pad_token` gives the model the same id."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_name(cfg.model.tokenizer or cfg.model.name))
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise TokenizerError(f"tokenizer of {cfg.model.tokenizer or cfg.model.name!r} has neither a padding nor "
                                 "an end-of-text token to pad batches with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def with_pad_token(cfg: Config, config):
    """The padding id the tokenizer batches with, on the model's config where the model reads it. A decoder
    classifies from the last token that is not padding, found by config.pad_token_id: any other id than the
    tokenizer's moves that position with the batch's padding (or fails, with none). Every build of the model,
    for training, reloading or export, passes here, so all of them agree; encoders keep a padding id they have
    (RoBERTa's also places its positions)."""
    if config.pad_token_id is not None and config.model_type not in LAST_TOKEN_POOLING:
        return config
    pad = load_tokenizer(cfg).pad_token_id
    vocab = getattr(config, "vocab_size", None)
    if vocab is not None and not 0 <= pad < vocab:
        raise TokenizerError(f"the tokenizer pads with id {pad}, outside the model's vocabulary of {vocab}; "
                             "use the model's own tokenizer")
    config.pad_token_id = pad
    return config


# the dropout settings of the families we adapt (BERT/RoBERTa/ELECTRA, DistilBERT, DeBERTa, ModernBERT, GPT-2,
# Llama/Qwen/Mistral's attention_dropout); the head's own classifier_dropout is left alone
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout", "attention_dropout",
                  "hidden_dropout", "attention_probs_dropout", "embedding_dropout", "mlp_dropout", "resid_pdrop",
                  "embd_pdrop", "attn_pdrop")


def set_base_dropout(config, p: float):
    """train.base_dropout onto the base's config: -1 keeps the checkpoint's values. Evaluation never drops anything,
    so this changes how a run trains, not what a reload computes."""
    if p >= 0:
        for name in DROPOUT_FIELDS:
            if isinstance(getattr(config, name, None), float):
                setattr(config, name, p)
    return config


def build_base(cfg: Config, config=None) -> torch.nn.Module:
    """The frozen base with a fresh head. Seeded, so random-weight bases and heads are reproducible."""
    config = set_base_dropout(config or load_model_config(cfg.model.name, cfg.model.num_labels), cfg.train.base_dropout)
    config = with_pad_token(cfg, config)
    torch.manual_seed(cfg.train.seed)
    with quiet():  # "some weights were newly initialised" is expected: that is the head we train
        if cfg.model.random_init:
            model = AutoModelForSequenceClassification.from_config(config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(resolve_name(cfg.model.name), config=config)
    return attention.fuse(shape_head(model, cfg.model.head))  # MPNet's attention fused, as BERT's already is


def peft_config(cfg: Config, plan: budget.Plan):
    """The peft config of the configured method (see `methods`), on exactly the planned modules."""
    return methods.peft_config(cfg, plan.target_regex, plan.head_names, plan.feedforward_regex,
                               plan.fan_in_fan_out)


def count_trainable(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def build(cfg: Config):
    """Plan (refusing over-budget configs before any weight loads), then wrap the base with the adapter."""
    from peft import get_peft_model

    config = load_model_config(cfg.model.name, cfg.model.num_labels)
    plan = budget.check(budget.plan(cfg, config))
    model = get_peft_model(build_base(cfg, config), peft_config(cfg, plan))
    methods.prepare(model, cfg)  # PiSSA/OLoRA: saving converts against the initial adapter
    trainable = count_trainable(model)
    if trainable != plan.total:  # the planner and peft must agree, or the budget means nothing
        raise RuntimeError(f"planner counted {plan.total:,} trainable parameters but peft trains {trainable:,}")
    return model, plan


def _tail(name_or_path: str) -> str:
    """'org/name' of a hub id or the last two folders of a path: a run folder copied to another machine, where the
    embedded model sits in another virtual environment, still matches its base."""
    return "/".join(Path(name_or_path).parts[-2:])


def load_trained(run: Path, cfg: Config, moved: bool = False, into=None, adapter_name: str = "default") -> torch.nn.Module:
    """The base model with the run's saved adapter, via plain `PeftModel.from_pretrained`, in eval mode.
    moved: the caller named the base's new place, so the name recorded in the adapter is not compared (the
    verification sample still proves the weights are the same). into: a PeftModel already holding the same base
    (`inference.load.share_key`) that takes this adapter, and its own copy of the head, as `adapter_name`; the base
    is then not loaded again."""
    from peft import PeftModel

    run = Path(run)
    missing = [f for f in ADAPTER_FILES if not (run / f).is_file()]
    if missing:
        raise AdapterError(f"{run}: no adapter ({', '.join(missing)} missing)")
    try:
        saved = json.loads((run / "adapter_config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = None
    if not isinstance(saved, dict) or "peft_type" not in saved:  # peft cannot read any other shape
        raise AdapterError(f"{run}/adapter_config.json is corrupt")
    trained_on = saved.get("base_model_name_or_path") or ""
    if trained_on and not moved and not cfg.model.random_init and _tail(trained_on) != _tail(resolve_name(cfg.model.name)):
        raise AdapterError(f"{run}: adapter was trained on {trained_on!r}, not on {cfg.model.name!r}")
    base = build_base(cfg) if into is None else None
    try:
        with quiet():
            if into is not None:
                with warnings.catch_warnings():  # transformers' own deprecation, raised inside peft's load_adapter
                    warnings.filterwarnings("ignore", category=FutureWarning)
                    into.load_adapter(str(run), adapter_name=adapter_name)
                model = into
            else:
                model = PeftModel.from_pretrained(base, str(run), adapter_name=adapter_name)
    except Exception as e:  # safetensors header errors, size mismatches (wrong num_labels or base), ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
        raise AdapterError(f"{run}: adapter ({ADAPTER_FILES[1]}) does not load onto {cfg.model.name!r} with "
                           f"{cfg.model.num_labels} labels: {first[:300]}") from None
    return model.eval()
