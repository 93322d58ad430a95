"""The config is the CLI: YAML round trip, flags, run ids, validation; and a CLI smoke run on tiny data."""
import json
import subprocess
import sys

import pandas as pd
import pytest

from budgetlora.cli import main
from budgetlora.config import Config, ConfigError
from tests.conftest import PUBLISHED


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
