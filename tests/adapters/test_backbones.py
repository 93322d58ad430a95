"""Decoders (Llama, Mistral, Qwen2/3, GPT-2) and newer encoders (ModernBERT, DeBERTa-v3) as classifiers: the planner
counts them exactly, from a config folder or a built-in name, and a tiny random-weight run of each trains, saves,
reloads to the same logits, predicts and merges.

The tiny configs share the embedded MiniLM tokenizer (vocabulary 30,522): hidden 32, two layers, four heads, grouped
key/value projections of 16 in the decoders, feed-forward 64."""
import json

import numpy as np
import pytest
import torch

from budgetlora import cli
from budgetlora.adapters.budget import format_plan, plan
from budgetlora.config import Config, ConfigError
from tests.conftest import tiny_config

VOCAB, H, KV, FF, LAYERS, LABELS = 30_522, 32, 16, 64, 2, 4


def _config(family: str):
    import transformers as tf

    decoder = {"vocab_size": VOCAB, "hidden_size": H, "intermediate_size": FF, "num_hidden_layers": LAYERS,
               "num_attention_heads": 4, "num_key_value_heads": 2}
    # MiniLM's [CLS] 101 and [SEP] 102 where a config names special ids (its defaults lie outside this vocabulary)
    return {
        "llama": lambda: tf.LlamaConfig(**decoder),
        "mistral": lambda: tf.MistralConfig(**decoder),
        "qwen2": lambda: tf.Qwen2Config(**decoder),
        "qwen3": lambda: tf.Qwen3Config(**decoder, head_dim=H // 4),
        "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=H, n_layer=LAYERS, n_head=4, bos_token_id=101,
                                      eos_token_id=102),
        "modernbert": lambda: tf.ModernBertConfig(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF,
                                                  num_hidden_layers=LAYERS, num_attention_heads=4, pad_token_id=0,
                                                  bos_token_id=101, cls_token_id=101, eos_token_id=102,
                                                  sep_token_id=102),
        "deberta-v2": lambda: tf.DebertaV2Config(vocab_size=VOCAB, hidden_size=H, intermediate_size=FF,
                                                 num_hidden_layers=LAYERS, num_attention_heads=4,
                                                 relative_attention=True, position_buckets=16,
                                                 pos_att_type=["p2c", "c2p"], position_biased_input=False),
    }[family]()


def lora(n_in: int, n_out: int, r: int = 4) -> int:
    return r * (n_in + n_out)


# (LoRA r=4 on q,k,v,o; on all six short names; the head), per family, from the shapes above
LLAMA_LIKE = (LAYERS * (2 * lora(H, H) + 2 * lora(H, KV)),
              LAYERS * (2 * lora(H, H) + 2 * lora(H, KV) + 2 * lora(H, FF) + lora(FF, H)),
              {"score": H * LABELS})  # no bias
EXPECTED = {
    "llama": LLAMA_LIKE, "mistral": LLAMA_LIKE, "qwen2": LLAMA_LIKE, "qwen3": LLAMA_LIKE,
    # fused c_attn (in 32, out 96) once for q, k and v; GPT-2's feed-forward is 4 x hidden
    "gpt2": (LAYERS * (lora(H, 3 * H) + lora(H, H)),
             LAYERS * (lora(H, 3 * H) + lora(H, H) + lora(H, 4 * H) + lora(4 * H, H)),
             {"score": H * LABELS}),
    # fused Wqkv once; Wi holds both halves of the gated feed-forward (out 2 x 64); head = dense + norm, no biases
    "modernbert": (LAYERS * (lora(H, 3 * H) + lora(H, H)),
                   LAYERS * (lora(H, 3 * H) + lora(H, H) + lora(H, 2 * FF) + lora(FF, H)),
                   {"head": H * H + H, "classifier": H * LABELS + LABELS}),
    "deberta-v2": (LAYERS * 4 * lora(H, H), LAYERS * (4 * lora(H, H) + lora(H, FF) + lora(FF, H)),
                   {"pooler": H * H + H, "classifier": H * LABELS + LABELS}),
}
FAMILIES = sorted(EXPECTED)
ALL = "q,k,v,o,ffn_in,ffn_out"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """One folder per family holding only its config.json, as a hub download of the config would."""
    root = tmp_path_factory.mktemp("configs")
    for family in FAMILIES:
        _config(family).save_pretrained(root / family)
    return {family: root / family for family in FAMILIES}


def tiny(folder, **overrides) -> Config:
    return Config().replace(**{"model.name": str(folder), "model.random_init": True, "model.tokenizer": "minilm",
                               "lora.r": 4, "lora.targets": "q,k,v,o", **overrides})


@pytest.mark.parametrize("family", FAMILIES)
def test_plan_from_a_config_folder_counts_by_hand(family, folders):
    attention, every, head = EXPECTED[family]
    p = plan(tiny(folders[family]))
    assert p.model_type == family and p.num_layers == LAYERS
    assert p.head == head and p.total == attention + sum(head.values())
    assert plan(tiny(folders[family], **{"lora.targets": ALL})).total == every + sum(head.values())
    top = plan(tiny(folders[family], **{"lora.layers": [-1]}))  # anchored on layer.N. / layers.N. / h.N.
    assert top.lora_params == attention // LAYERS and all(".1." in n for n in top.lora_per_module)


def test_fused_qkv_is_one_module_counted_once(folders):
    for family in ("gpt2", "modernbert"):
        one, three = plan(tiny(folders[family], **{"lora.targets": "q"})), plan(tiny(folders[family]))
        assert one.lora_per_module == {n: c for n, c in three.lora_per_module.items() if n in one.lora_per_module}
        assert three.lora_params == one.lora_params + LAYERS * lora(H, H)  # + o only
        assert "target 'k': the same 2 modules as 'q' (a fused projection), counted once" in format_plan(three)
    gpt2 = plan(tiny(folders["gpt2"]))
    assert gpt2.fan_in_fan_out and not plan(tiny(folders["llama"])).fan_in_fan_out
    assert set(gpt2.matches["q"]) == {"transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"}
    llama = plan(tiny(folders["llama"], **{"lora.targets": "ffn_in"}))
    kinds = sorted(n.rsplit(".", 1)[-1] for n in llama.matches["ffn_in"])
    assert kinds == ["gate_proj"] * LAYERS + ["up_proj"] * LAYERS


def test_gpt2_conv1d_methods_and_refusals(folders):
    with pytest.raises(ConfigError, match="method loha cannot adapt the Conv1D layers of this gpt2 model"):
        plan(tiny(folders["gpt2"], method="loha"))
    with pytest.raises(ConfigError, match="classification head"):
        plan(tiny(folders["llama"], **{"lora.targets": "q,score"}))
    from budgetlora.adapters.model import peft_config

    cfg = tiny(folders["gpt2"])
    assert peft_config(cfg, plan(cfg)).fan_in_fan_out is True


# real sizes from built-in configs, offline; worked out from the published shapes, 4 labels
QWEN2_05B = {"q,v": 24 * (lora(896, 896, 8) + lora(896, 128, 8)) + 896 * 4,  # 14 heads of 64, 2 key/value heads
             "q,k,v,o": 24 * (2 * lora(896, 896, 8) + 2 * lora(896, 128, 8)) + 896 * 4}
MODERNBERT_HEAD = 768 * 768 + 768 + 768 * 4 + 4  # head.dense and head.norm without biases, classifier with one
MODERNBERT_BASE = {"q,v": 22 * lora(768, 3 * 768, 8) + MODERNBERT_HEAD,  # fused Wqkv, once
                   "q,k,v,o": 22 * (lora(768, 3 * 768, 8) + lora(768, 768, 8)) + MODERNBERT_HEAD}
DEBERTA_V3_HEAD = 768 * 768 + 768 + 768 * 4 + 4  # pooler.dense + classifier
LLAMA32_1B = 16 * (lora(2048, 2048, 8) + lora(2048, 512, 8)) + 2048 * 4  # q,v: 32 heads of 64, 8 key/value heads


@pytest.mark.parametrize("name,targets,total", [
    *[("Qwen/Qwen2-0.5B", t, n) for t, n in QWEN2_05B.items()],
    *[("answerdotai/ModernBERT-base", t, n) for t, n in MODERNBERT_BASE.items()],
    ("microsoft/deberta-v3-base", "q,v", 12 * 2 * lora(768, 768, 8) + DEBERTA_V3_HEAD),
    ("meta-llama/Llama-3.2-1B", "q,v", LLAMA32_1B)])
def test_builtin_real_sizes(name, targets, total, capsys, tmp_path):
    assert QWEN2_05B == {"q,v": 544_256, "q,k,v,o": 1_084_928}
    assert MODERNBERT_BASE == {"q,v": 1_134_340, "q,k,v,o": 1_404_676}
    args = ["plan", "--model.name", name, "--lora.r", "8", "--lora.targets", targets, "--json"]
    code = cli.main(args)
    out = json.loads(capsys.readouterr().out)
    assert out["total"] == total and code == (0 if total <= 1_000_000 else 3)
    # the same config written to a folder plans the same through AutoConfig
    from budgetlora.adapters.architectures import load_model_config

    load_model_config(name, LABELS).save_pretrained(tmp_path / "cfg")
    cli.main(["plan", "--model.name", str(tmp_path / "cfg"), *args[3:]])
    assert json.loads(capsys.readouterr().out)["total"] == total


def test_pad_token_comes_from_the_tokenizer(folders):
    from budgetlora.adapters.model import TokenizerError, with_pad_token

    for family in ("llama", "qwen2", "gpt2"):
        config = _config(family)
        assert with_pad_token(tiny(folders[family]), config).pad_token_id == 0  # MiniLM's [PAD]
    mismatched = _config("mistral")
    mismatched.pad_token_id = 7  # a decoder pools where the tokenizer pads, whatever its config said
    assert with_pad_token(tiny(folders["mistral"]), mismatched).pad_token_id == 0
    deberta = _config("deberta-v2")
    deberta.pad_token_id = 5  # an encoder keeps the id it has
    assert with_pad_token(tiny(folders["deberta-v2"]), deberta).pad_token_id == 5
    small = _config("llama")
    small.vocab_size = 0
    with pytest.raises(TokenizerError, match="outside the model's vocabulary of 0"):
        with_pad_token(tiny(folders["llama"]), small)


def test_base_dropout_reaches_every_family():
    from budgetlora.adapters.model import set_base_dropout

    fields = {"gpt2": ("resid_pdrop", "embd_pdrop", "attn_pdrop"), "modernbert": ("embedding_dropout", "mlp_dropout",
              "attention_dropout"), "llama": ("attention_dropout",), "deberta-v2": ("hidden_dropout_prob",)}
    for family, names in fields.items():
        config = set_base_dropout(_config(family), 0.25)
        assert all(getattr(config, n) == 0.25 for n in names), family


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_planner_matches_peft(family, folders):
    from budgetlora.adapters.model import build, count_trainable

    attention, every, head = EXPECTED[family]
    for targets, adapters in (("q,k,v,o", attention), (ALL, every)):
        model, p = build(tiny(folders[family], **{"lora.targets": targets}))
        assert count_trainable(model) == p.total == adapters + sum(head.values())
        adapted = {n.removeprefix("base_model.model.").removesuffix(".lora_A.default")
                   for n, _ in model.named_modules() if n.endswith("lora_A.default")}
        assert adapted == set(p.lora_per_module)
        trained_heads = {n.split(".")[2] for n, prm in model.named_parameters()
                         if prm.requires_grad and "modules_to_save" in n}
        assert trained_heads == set(head)


@pytest.mark.slow
@pytest.mark.parametrize("method,overrides", [("dora", {"lora.dora": True}), ("adalora", {"method": "adalora"}),
                                              ("vera", {"method": "vera", "vera.r": 16}),
                                              ("ia3", {"method": "ia3", "lora.targets": "k,v,ffn_out"})])
def test_gpt2_conv1d_other_methods_match_peft(method, overrides, folders):
    from budgetlora.adapters.model import build, count_trainable

    model, p = build(tiny(folders["gpt2"], **overrides))
    assert count_trainable(model) == p.total and p.fan_in_fan_out


def _run_and_check(cfg, tmp_path, heads, family=""):
    """Train, then: the head is in the adapter file, the reload reproduces the trained logits, and the merged plain
    folder computes what the adapter does; returns the loaded run."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from budgetlora import runs
    from budgetlora.inference.export import ExportError, export_merged, merge
    from budgetlora.inference.load import load_run
    from budgetlora.training.evaluate import predict_logits
    from budgetlora.training.train import train

    out = train(cfg, root=tmp_path / "runs")
    assert runs.read_json(out / runs.METRICS)["trainable_params"] == plan(cfg).total
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {h for h in heads if any(k.startswith(f"base_model.model.{h}.") for k in weights)} == set(heads)
    loaded = load_run(out, verify=True)
    texts = ["Stocks fell as oil prices rose.", "The team won the final after extra time.", "A chip."]
    assert loaded.logits(texts).shape == (3, LABELS)
    if family in FORCED_TOKENIZER:
        # transformers loads a qwen2 folder's tokenizer as Qwen2's own class whatever tokenizer_config.json names,
        # so MiniLM's WordPiece would come back as something else: the export's check refuses the folder
        with pytest.raises(ExportError, match="merged model disagrees with the adapter"):
            export_merged(out, tmp_path / "merged")
        assert not (tmp_path / "merged").exists()
        unmerged = load_run(out, verify=False)
        merged = merge(load_run(out, verify=False))
        got = predict_logits(merged, unmerged.tokenizer, texts, cfg.model.max_length)
        assert np.abs(got - unmerged.logits(texts, exact=True)).max() <= 1e-4
        return loaded
    info = export_merged(out, tmp_path / "merged")
    assert info["max_abs_logit_diff"] <= 1e-4
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert merged.config.pad_token_id == tokenizer.pad_token_id == loaded.tokenizer.pad_token_id
    got = predict_logits(merged, tokenizer, texts, cfg.model.max_length)
    assert np.abs(got - loaded.logits(texts, exact=True)).max() <= 1e-4
    return loaded


FORCED_TOKENIZER = {"qwen2"}


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_run_trains_reloads_predicts_and_merges(family, folders, small_csvs, tmp_path):
    cfg = tiny_config(small_csvs, **{"model.name": str(folders[family]), "model.random_init": True,
                                     "model.tokenizer": "minilm", "lora.r": 4, "lora.targets": ALL,
                                     "train.max_steps": 6, "train.eval_every": 3})
    _run_and_check(cfg, tmp_path, list(EXPECTED[family][2]), family)


@pytest.fixture
def padless_tokenizer(tmp_path, small_csvs):
    """A word-level tokenizer with an end-of-text token and no padding token, as GPT-2's and Llama 3's ship."""
    import pandas as pd
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = pd.read_csv(small_csvs[0])["text"].str.lower().str.split().explode().value_counts().index[:2000]
    vocab = {"<unk>": 0, "</s>": 1, **{w: i + 2 for i, w in enumerate(w for w in words if w not in ("<unk>", "</s>"))}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>").save_pretrained(tmp_path / "tok")
    return tmp_path / "tok", len(vocab)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_tokenizer_without_pad_pads_with_eos_everywhere(family, padless_tokenizer, small_csvs, tmp_path):
    """pad = eos on the tokenizer and on the model's config alike, so the pooled last real token does not move
    with the batch's padding: a text scores the same alone and beside a longer one, in training, after the
    reload and in the merged folder."""
    from budgetlora.adapters.model import build_base, load_tokenizer

    folder, size = padless_tokenizer
    config = _config(family)
    config.vocab_size, config.bos_token_id, config.eos_token_id = size, 1, 1
    config.save_pretrained(tmp_path / "model")
    cfg = tiny_config(small_csvs, **{"model.name": str(tmp_path / "model"), "model.random_init": True,
                                     "model.tokenizer": str(folder), "lora.r": 4, "train.max_steps": 4,
                                     "train.eval_every": 2})
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.pad_token == "</s>" and tokenizer.pad_token_id == 1
    assert build_base(cfg).config.pad_token_id == 1
    loaded = _run_and_check(cfg, tmp_path, ["score"])
    short, longer = "stocks fell", "the team won the final after a long season of hard games"
    with torch.no_grad():
        alone, beside = loaded.logits([short], exact=True), loaded.logits([short, longer], exact=True)
    np.testing.assert_allclose(alone[0], beside[0], atol=1e-5)
