"""What we know about the architectures we adapt: where a model lives, and what the short target names mean in it.

Short names (q, k, v, o, ffn_in, ffn_out) map to module paths *relative to one transformer layer* (`layer.N.` in
BERT, `layers.N.` in Llama or ModernBERT, `h.N.` in GPT-2). Matching the relative path exactly, anchored at the
layer index, is what keeps `ffn_out` ("output.dense") from also catching `attention.output.dense`, the suffix trap
that plain peft target names fall into. A name may mean several modules (Llama's `ffn_in` is its gate and up
projections); where q, k and v are one fused projection (GPT-2's `c_attn`, ModernBERT's `Wqkv`) each of them means
that projection, and it is adapted and counted once however many of the three are named.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForSequenceClassification, PretrainedConfig

from budgetlora.adapters import packaged
from budgetlora.adapters.packaged import ModelNotFound
from budgetlora.errors import ConfigError

EMBEDDED = "minilm"
PACKAGED = {"minilm": packaged.minilm_path, "mpnet": lambda: str(packaged.model_path(packaged.MPNET))}

_BERT_LIKE = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "o": "attention.output.dense",
    "ffn_in": "intermediate.dense",
    "ffn_out": "output.dense",
}
_LLAMA_LIKE = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "ffn_in": ("mlp.gate_proj", "mlp.up_proj"),  # the gated feed-forward's two input projections
    "ffn_out": "mlp.down_proj",
}
SHORT_NAMES: dict[str, dict[str, str | tuple[str, ...]]] = {
    "bert": _BERT_LIKE,
    "mpnet": {
        "q": "attention.attn.q", "k": "attention.attn.k", "v": "attention.attn.v", "o": "attention.attn.o",
        "ffn_in": "intermediate.dense", "ffn_out": "output.dense",
    },
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
    "modernbert": {
        "q": "attn.Wqkv", "k": "attn.Wqkv", "v": "attn.Wqkv", "o": "attn.Wo", "ffn_in": "mlp.Wi", "ffn_out": "mlp.Wo",
    },
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gpt2": {  # transformers' Conv1D layers, weight stored (in, out)
        "q": "attn.c_attn", "k": "attn.c_attn", "v": "attn.c_attn", "o": "attn.c_proj",
        "ffn_in": "mlp.c_fc", "ffn_out": "mlp.c_proj",
    },
}
# decoders classify from the last token that is not padding, found by config.pad_token_id (see model.with_pad_token)
LAST_TOKEN_POOLING = frozenset({"llama", "mistral", "qwen2", "qwen3", "gpt2"})


def resolve_name(name: str) -> str:
    """'minilm' and 'mpnet' → the folders their pip packages bring (see `packaged`); anything else as given."""
    return PACKAGED[name]() if name in PACKAGED else name


def is_missing_folder(name: str) -> bool:
    """A name written as a filesystem path (absolute, ./, ../, ~) whose folder is not here. Hub ids ('org/name')
    and the embedded 'minilm' are never paths."""
    return bool(name) and name.startswith(("/", "./", "../", "~", "\\")) and not Path(name).expanduser().exists()


def _builtin_config(name: str) -> PretrainedConfig | None:
    """Configs of common bases, so planning and random-weight runs work without the hub: the published config.json
    values that decide a shape, plus those a random-weight run reads (positions, special ids, rope)."""
    from transformers import BertConfig, RobertaConfig

    if name == "mpnet":  # all-mpnet-base-v2's config.json, so planning needs neither its parts nor their assembly
        from transformers import MPNetConfig

        return MPNetConfig(vocab_size=30527, layer_norm_eps=1e-5, max_position_embeddings=514, pad_token_id=1,
                           bos_token_id=0, eos_token_id=2, relative_attention_num_buckets=32)
    base = name.rstrip("/").split("/")[-1]
    if base in _NEWER:
        return _NEWER[base]()
    if base == "roberta-base":
        return RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1)
    if base == "roberta-large":
        return RobertaConfig(vocab_size=50265, max_position_embeddings=514, type_vocab_size=1, pad_token_id=1,
                             hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096)
    if base in ("bert-base-uncased", "bert-base-cased"):
        return BertConfig()
    return None


def _qwen2_05b() -> PretrainedConfig:
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                       num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True,
                       max_position_embeddings=131072, bos_token_id=151643, eos_token_id=151643, rms_norm_eps=1e-6,
                       rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0})


def _llama32_1b() -> PretrainedConfig:
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=64, tie_word_embeddings=True,
                       max_position_embeddings=131072, bos_token_id=128000, eos_token_id=128001, rms_norm_eps=1e-5,
                       rope_parameters={"rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 8192})


def _modernbert(large: bool) -> PretrainedConfig:
    from transformers import ModernBertConfig

    # the defaults are the base model's (hidden 768, 22 layers, intermediate 1152, vocabulary 50368)
    sizes = {"hidden_size": 1024, "num_hidden_layers": 28, "num_attention_heads": 16, "intermediate_size": 2624}
    return ModernBertConfig(**(sizes if large else {}))


def _deberta_v3(large: bool) -> PretrainedConfig:
    from transformers import DebertaV2Config

    sizes = ({"hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16, "intermediate_size": 4096}
             if large else {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                            "intermediate_size": 3072})
    return DebertaV2Config(vocab_size=128100, max_position_embeddings=512, type_vocab_size=0, layer_norm_eps=1e-7,
                           relative_attention=True, position_buckets=256, pos_att_type=["p2c", "c2p"],
                           max_relative_positions=-1, norm_rel_ebd="layer_norm", share_att_key=True,
                           position_biased_input=False, pad_token_id=0, **sizes)


_NEWER = {
    "Qwen2-0.5B": _qwen2_05b, "Qwen2-0.5B-Instruct": _qwen2_05b,
    "Llama-3.2-1B": _llama32_1b, "Llama-3.2-1B-Instruct": _llama32_1b,
    "ModernBERT-base": lambda: _modernbert(False), "ModernBERT-large": lambda: _modernbert(True),
    "deberta-v3-base": lambda: _deberta_v3(False), "deberta-v3-large": lambda: _deberta_v3(True),
}


def load_model_config(name: str, num_labels: int) -> PretrainedConfig:
    """The model's config (a small JSON file), never its weights; for a packaged model not yet assembled, the
    config it will have."""
    path = str(packaged.assembled(name) or name) if name in PACKAGED and name != EMBEDDED else resolve_name(name)
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


def skeleton(config: PretrainedConfig, head: str = "auto") -> torch.nn.Module:
    """The model's module tree on the meta device, with the configured head: exact shapes, no memory, no weights."""
    with torch.device("meta"), quiet():
        return shape_head(AutoModelForSequenceClassification.from_config(config), head)


class FirstTokenLinear(torch.nn.Module):
    """model.head linear: one Linear on the first token's final hidden state, where RoBERTa-shaped heads put a
    768x768 dense layer and tanh before it. Its parameters are named like that head's last layer (out_proj)."""

    def __init__(self, hidden: int, num_labels: int, dropout: float, init_std: float):
        super().__init__()
        self.dropout = torch.nn.Dropout(dropout)
        self.out_proj = torch.nn.Linear(hidden, num_labels)
        if self.out_proj.weight.device.type != "meta":  # transformers' own init of a fresh head
            torch.nn.init.normal_(self.out_proj.weight, std=init_std)
            torch.nn.init.zeros_(self.out_proj.bias)

    def forward(self, features: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.out_proj(self.dropout(features[:, 0, :]))


def shape_head(model: torch.nn.Module, head: str) -> torch.nn.Module:
    """model.head onto a freshly built model: every build (planner, training, reload, export) passes here, so the
    planned, trained and reloaded heads are the same module."""
    if head == "auto":
        return model
    own = getattr(model, "classifier", None)
    if not (hasattr(own, "dense") and hasattr(own, "out_proj")):  # BERT, DistilBERT, decoders: one Linear already
        raise ConfigError(f"model.head linear: the head of this {model.config.model_type} model is already one "
                          "linear layer (use model.head auto)")
    dropout = own.dropout.p if isinstance(getattr(own, "dropout", None), torch.nn.Dropout) else 0.0
    with torch.device(own.out_proj.weight.device):
        model.classifier = FirstTokenLinear(own.out_proj.in_features, own.out_proj.out_features, dropout,
                                            getattr(model.config, "initializer_range", 0.02))
    return model


def head_modules(model: torch.nn.Module) -> list[str]:
    """Top-level children that are not the base model: the classification head (trained in full). `classifier`
    for BERT-likes; DeBERTa's `pooler` and ModernBERT's `head` (dense + norm) before it; a decoder's `score`."""
    prefix = model.base_model_prefix
    return [n for n, m in model.named_children() if n != prefix and any(True for _ in m.parameters())]


def short_name_map(model_type: str) -> dict[str, tuple[str, ...]]:
    """Each short name of the architecture with the layer-relative paths it means."""
    return {k: (v,) if isinstance(v, str) else tuple(v) for k, v in SHORT_NAMES.get(model_type, {}).items()}


def is_conv1d(module: torch.nn.Module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def linear_shape(module: torch.nn.Module) -> tuple[int, int] | None:
    """(in, out) of a layer an adapter can wrap: torch's Linear, or transformers' Conv1D (GPT-2), which computes
    the same product with its weight stored transposed, (in, out); None for anything else."""
    if isinstance(module, torch.nn.Linear):
        return module.in_features, module.out_features
    if is_conv1d(module):
        n_in, n_out = module.weight.shape
        return int(n_in), int(n_out)
    return None


@contextlib.contextmanager
def quiet():
    from transformers.utils import logging

    old = logging.get_verbosity()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(old)

