"""The config is the CLI: YAML round trip, flags, run ids, validation; and a CLI smoke run on tiny data."""
import argparse
import copy
import dataclasses
import functools
import json
import subprocess
import sys
import typing

import pandas as pd
import pytest

from budgetlora import config as config_mod
from budgetlora.cli import main
from budgetlora.config import BASELINE_FIELDS, METHODS, NOT_IDENTITY, USE_SECTIONS, Config, ConfigError
from budgetlora.config.flags import add_section_flags, field_, leaves
from tests.conftest import PUBLISHED
from tests.test_presets import CONFIGS, RUN_IDS


def test_yaml_round_trip_and_run_id(tmp_path):
    cfg = Config().replace(**{"lora.r": 4, "lora.targets": "q,k,v", "train.lr": 1e-3, "name": "x"})
    p = tmp_path / "c.yaml"
    p.write_text(cfg.to_yaml())
    again = Config.from_yaml(p)
    assert again == cfg and again.run_id == cfg.run_id
    assert cfg.replace(name="other").run_id == cfg.run_id  # the label is not part of the identity
    assert cfg.replace(**{"lora.r": 5}).run_id != cfg.run_id
    assert again.lora.targets == ["q", "k", "v"]


@pytest.mark.parametrize("overrides,message", [
    ({"lora.r": 0}, "lora.r"), ({"train.optimizer": "adam"}, "train.optimizer"),
    ({"augment.swap": 1.5}, "augment.swap"), ({"lora.bias": "some"}, "lora.bias"),
    ({"train.lr": "fast"}, "cannot read"), ({"lora.rank": 4}, "unknown config key"),
])
def test_bad_values(overrides, message):
    with pytest.raises(ConfigError, match=message):
        Config().replace(**overrides)


def test_bad_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("lora:\n  r: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Config.from_yaml(p)
    p.write_text("lora:\n  rank: 4\n")
    with pytest.raises(ConfigError, match="lora.rank"):
        Config.from_yaml(p)


def test_plan_command(capsys):
    assert main(["plan", "--model.name", "roberta-base", "--lora.r", "10", "--lora.targets", "q,v"]) == 0
    out = capsys.readouterr().out
    assert "962,308" in out and "roberta.encoder.layer.11.attention.self.value" in out
    assert main(["plan", "--model.name", "roberta-base", "--lora.r", "12", "--lora.targets", "q,v"]) == 3


def test_plan_json_fill(capsys):
    main(["plan", "--model.name", "roberta-base", "--max-rank", "--json", "--lora.targets", "q,k,v"])
    out = json.loads(capsys.readouterr().out)
    assert out["r"] == 7 and out["total"] == 980_740 and out["fits"]


def test_errors_are_one_line(tmp_path, capsys):
    assert main(["train", "--model.name", "roberta-base", "--lora.r", "12"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("budgetlora: error: over budget") and "\n" not in err
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,7\n")
    assert main(["train", "--data.train", str(bad)]) == 2
    assert "outside 0..3" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope"), "--input", str(bad), "--output", str(tmp_path / "o.csv")]) == 2
    assert "not found" in capsys.readouterr().err
    assert not (tmp_path / "o.csv").exists()


@pytest.mark.slow
def test_cli_train_evaluate_predict(tmp_path, small_csvs, tiny_run):
    """The console script end to end: train on tiny data, evaluate, predict a pickled Dataset."""
    import datasets

    train_csv, test_csv = small_csvs
    cmd = [sys.executable, "-m", "budgetlora.cli"]
    r = subprocess.run(cmd + ["train", "--runs", str(tmp_path / "runs"), "--data.train", str(train_csv),
                              "--data.test", str(test_csv), "--model.max_length", "32", "--train.max_steps", "3",
                              "--train.batch_size", "16"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "test accuracy" in r.stdout
    unl = tmp_path / "unlabelled.pkl"
    texts = pd.read_csv(test_csv)["text"].tolist()[:40]
    pd.to_pickle(datasets.Dataset.from_dict({"text": texts}), unl)
    out = tmp_path / "sub.csv"
    assert main(["predict", str(tiny_run), "--input", str(unl), "--output", str(out)]) == 0
    sub = pd.read_csv(out)
    assert list(sub.columns) == ["ID", "Label"] and sub["ID"].tolist() == list(range(40))
    assert sub["Label"].between(0, 3).all()
    from budgetlora.inference.load import load_run

    assert sub["Label"].tolist() == load_run(tiny_run).logits(texts).argmax(1).tolist()
    assert main(["evaluate", str(tiny_run), "--input", str(test_csv)]) == 0


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan")])
def test_float_fields_refuse_nan_and_infinity(value):
    from budgetlora.config import ConfigError

    with pytest.raises(ConfigError, match="lora.alpha: cannot read"):
        Config().replace(**{"lora.alpha": value})


def test_use_sections_are_not_part_of_the_run_id():
    cfg = Config.from_yaml("minilm-default").replace(**PUBLISHED)
    assert cfg.run_id == "a18e192f1c"
    used = cfg.replace(**{"serve.max_batch": 8, "submit.rounds": 2, "self_train.share": 0.3})
    assert used.run_id == cfg.run_id and used.serve.max_batch == 8
    assert used.replace(**{"lora.r": 4}).run_id != cfg.run_id


@pytest.mark.parametrize("argv,message", [
    (["serve", "no-such-run", "--max-batch", "0"], "serve.max_batch must be >= 1"),
    (["serve", "no-such-run", "--port", "eighty"], "serve.port: cannot read 'eighty' as int"),
    (["self-train", "no-such-run", "--input", "u.csv", "--mix", "1"], "self_train.mix must be in [0, 1), got 1.0"),
    (["submit", "--input", "t.csv", "--output", "o.csv", "--steps", "0"], "submit.steps must be >= 1"),
])
def test_bad_section_values_are_one_line(argv, message, capsys):
    """A bad command setting is refused before anything is loaded or trained, as one line."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"budgetlora: error: {message}"


def test_bad_section_value_in_yaml_is_one_line(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("submit:\n  prior_correction: sometimes\n")
    assert main(["submit", "--config", str(p), "--input", "t.csv", "--output", "o.csv"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "submit.prior_correction must be one of off, auto, on" in err


def test_command_settings_flags_stay_on_their_commands():
    from budgetlora.cli import build_parser

    train_help = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--lora.r" in train_help and "--serve." not in train_help and "--submit." not in train_help
    serve_help = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    assert "--max-batch" in serve_help and "texts per forward pass" in serve_help


# -- run identity: a field added with a default leaves every run id as it was ----------------------------------------
def _published_configs() -> list[Config]:
    """Every preset, and every config of tests/preset_run_ids.json."""
    presets = [Config.from_yaml(CONFIGS / f"{name}.yaml") for name in RUN_IDS["presets"]]
    cases = [(Config.from_yaml(c["preset"]) if "preset" in c else Config()).replace(**c["overrides"])
             for c in RUN_IDS["configs"].values()]
    return presets + cases


def _with_added_field(section: str, default):
    """A Config whose `section` ('' for the top level, or a section name that does not exist yet) has one more field,
    `added`, defaulting to `default`: the config as it would be the day that field is added."""
    added = [("added", type(default), field_(default, "a field added later"))]
    if not section:
        return dataclasses.make_dataclass("WithAdded", added, bases=(Config,), frozen=True)
    own = typing.get_type_hints(Config).get(section)
    grown = dataclasses.make_dataclass(f"Grown_{section}", added, bases=(own,) if own else (), frozen=True)
    return dataclasses.make_dataclass("WithAdded", [(section, grown, dataclasses.field(default_factory=grown))],
                                      bases=(Config,), frozen=True)


def _other(value):
    return (not value) if isinstance(value, bool) else value + (0.5 if isinstance(value, float) else
                                                                 1 if isinstance(value, int) else "x")


@pytest.mark.parametrize("section,default", [
    ("", "x"), ("model", 0), ("data", ""), ("lora", 1.0), ("train", False), ("augment", 0.0), ("filter", 0),
    ("budget", 0), ("adalora", 1), ("ia3", True), ("serve", 0), ("a_new_section", 0),
])
def test_a_field_added_with_a_default_keeps_every_run_id(section, default):
    """Without any list to update: at its default the new field leaves every published id alone; set away from it,
    the field makes another training, unless it sits where the run id never looks (another method's section, the
    settings of the commands that use a run)."""
    grown = _with_added_field(section, default)
    for cfg in _published_configs():
        d = cfg.to_dict()
        assert grown.from_dict(d).run_id == cfg.run_id
        if section == "filter" and cfg.model.problem_type == "multi":
            continue  # a label set refuses any filter setting
        moved = copy.deepcopy(d)
        (moved.setdefault(section, {}) if section else moved)["added"] = _other(default)
        ignored = section in USE_SECTIONS or (section in METHODS and section not in ("lora", cfg.method))
        assert (grown.from_dict(moved).run_id == cfg.run_id) == ignored, (section, cfg.method)


def _flat(tree: dict, prefix: str = "") -> set[str]:
    return {k for key, v in tree.items()
            for k in (_flat(v, f"{prefix}{key}.") if isinstance(v, dict) else {prefix + key})}


def test_baseline_fields_exist_and_count_at_their_defaults():
    keys = {key for key, _, _ in leaves(Config)}
    assert BASELINE_FIELDS <= keys, f"baseline fields that no longer exist: {sorted(BASELINE_FIELDS - keys)}"
    assert not any(k == n or k.startswith(n + ".") for k in BASELINE_FIELDS for n in NOT_IDENTITY)
    # a default config's identity is exactly the baseline of the sections its method reads
    unused = set(METHODS) - {"lora"}
    assert _flat(config_mod._identity(Config())) == {k for k in BASELINE_FIELDS if k.split(".")[0] not in unused}
    in_use = _flat(config_mod._identity(Config().replace(method="vera")))
    assert in_use == {k for k in BASELINE_FIELDS if k.split(".")[0] not in unused - {"vera"}} | {"method"}


# -- fields with a fixed set of values: declared once, on the field ------------------------------------------------
ENUMERATED = [(key, f) for key, f, _ in leaves(Config) if "choices" in f.metadata]


def test_enumerated_fields_declare_their_values():
    assert {key for key, _ in ENUMERATED} >= {
        "method", "model.problem_type", "model.head", "lora.bias", "lora.init", "train.optimizer", "train.schedule",
        "train.precision", "train.padding", "train.loss", "train.select", "self_train.prior_correction",
        "submit.prior_correction", "serve.backend"}
    assert not hasattr(config_mod, "CHOICES")


def _flag_action(key: str) -> argparse.Action:
    """The argparse action of `key`'s flag, built the way the CLI builds it."""
    parser = argparse.ArgumentParser()
    section = key.split(".")[0]
    if section in USE_SECTIONS:
        add_section_flags(parser, type(getattr(Config(), section)), section)
    else:
        config_mod.add_flags(parser)
    return next(a for a in parser._actions if a.dest == f"cfg:{key}")


@pytest.mark.parametrize("key,f", ENUMERATED, ids=[k for k, _ in ENUMERATED])
def test_choices_help_and_error_come_from_the_declaration(key, f):
    allowed = f.metadata["choices"]
    action = _flag_action(key)
    # --help shows the declared values (as argparse shows choices) next to the field's own help text; the value is
    # checked by the config, so a bad flag is the same one-line error as a bad YAML or Python value
    assert action.metavar == "{" + ",".join(allowed) + "}"
    assert action.help == f"{f.metadata['help']} (default: {f.default})" and action.choices is None
    for value in allowed:
        assert functools.reduce(getattr, key.split("."), Config().replace(**{key: value})) == value
    with pytest.raises(ConfigError) as e:
        Config().replace(**{key: "nope"})
    assert str(e.value) == f"{key} must be one of {', '.join(allowed)}, got 'nope'"


@pytest.mark.parametrize("argv,message", [
    (["plan", "--train.loss", "hinge"], "train.loss must be one of ce, focal, got 'hinge'"),
    (["plan", "--method", "boft"], "method must be one of lora, adalora, vera, loha, lokr, ia3, got 'boft'"),
    (["serve", "no-such-run", "--backend", "gpu"], "serve.backend must be one of torch, onnx, got 'gpu'"),
])
def test_a_bad_choice_on_the_command_line_is_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == f"budgetlora: error: {message}"
