"""Multi-label classification (model.problem_type multi): label sets read into a 0/1 matrix, BCE training, metrics
at thresholds tuned on validation, and ID,Labels predictions."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from budgetlora.cli import build_parser, main
from budgetlora.config import Config, from_flags
from budgetlora.data.readers import Split, load_data, stratified_indices, to_split, train_val_split
from budgetlora.errors import ConfigError, DataError
from budgetlora.tasks import TASKS, class_names, format_sets, multilabel_metrics, task_of, tune_thresholds
from budgetlora.training.multilabel import MultiLabelLoss
from tests.conftest import PUBLISHED


def _logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


# -- reading ----------------------------------------------------------------------------------------------------
def test_delimited_labels_become_a_0_1_matrix():
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["1;2", "0", " 3 ; 0 ", "2;2"]})
    split = to_split(df, "x.csv", "text", "label", 4, delimiter=";")
    assert split.labels.tolist() == [[0, 1, 1, 0], [1, 0, 0, 0], [1, 0, 0, 1], [0, 0, 1, 0]]
    # integer cells (a parquet column) and another delimiter
    df = pd.DataFrame({"text": ["a", "b"], "label": [2, "0|1"]})
    assert to_split(df, "x", "text", "label", 3, delimiter="|").labels.tolist() == [[0, 0, 1], [1, 1, 0]]


@pytest.mark.parametrize("cell, words", [
    ("1;x", "row 1: label '1;x' is not a ';'-separated list of integer label ids"),
    ("1,2", "row 1: label '1,2' is not a ';'-separated list"),
    ("0;4", "row 1: label id 4 is outside 0..3"),
    ("-1", "row 1: label id -1 is outside 0..3"),
    ("", "row 1: no labels (an empty label set)"),
    (" ; ", "row 1: no labels"),
    ("1;;2", "row 1: label '1;;2' is not"),
])
def test_malformed_label_sets_are_one_data_error_naming_the_row(cell, words):
    df = pd.DataFrame({"text": ["a", "b"], "label": ["0", cell]})
    with pytest.raises(DataError) as e:
        to_split(df, "x.csv", "text", "label", 4, delimiter=";")
    assert words in str(e.value) and "\n" not in str(e.value)


def test_single_label_reading_is_unchanged():
    df = pd.DataFrame({"text": ["a", "b"], "label": ["1", "3"]})
    assert to_split(df, "x", "text", "label", 4).labels.tolist() == [1, 3]
    with pytest.raises(DataError, match="is not an integer"):
        to_split(pd.DataFrame({"text": ["a"], "label": ["1;2"]}), "x", "text", "label", 4)


# -- one 0/1 column per label (data.label_columns) -----------------------------------------------------------------
COLS = ["toxic", "obscene", "threat"]


def test_label_columns_become_a_0_1_matrix():
    df = pd.DataFrame({"text": ["a", "b", "c", "d"], "label": ["junk"] * 4,  # the label column is not read
                       "toxic": [1, 0, True, "1"], "obscene": ["0", " 1 ", False, "TRUE"],
                       "threat": [0.0, 1.0, 1, "0.0"]})
    split = to_split(df, "x.csv", "text", "label", 3, delimiter=";", label_columns=COLS)
    assert split.labels.tolist() == [[1, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0]]
    assert split.labels.dtype == np.int64
    # in the config's order, not the table's; a pickled table may name its columns by numbers
    df = pd.DataFrame({"text": ["a", "b"], 1: [1, 0], 0: [0, 1]})
    assert to_split(df, "x", "text", "label", 2, label_columns=[0, 1]).labels.tolist() == [[0, 1], [1, 0]]


@pytest.mark.parametrize("cell, words", [
    (2, "row 1, column 'obscene': '2' is not 0 or 1"),
    ("yes", "row 1, column 'obscene': 'yes' is not 0 or 1"),
    (0.5, "row 1, column 'obscene': '0.5' is not 0 or 1"),
    (-1, "row 1, column 'obscene': '-1' is not 0 or 1"),
    ("", "row 1, column 'obscene': '' is not 0 or 1"),
    (None, "row 1, column 'obscene': '' is not 0 or 1"),
    ("1;2", "row 1, column 'obscene': '1;2' is not 0 or 1"),
])
def test_a_label_cell_that_is_not_0_or_1_is_one_data_error_naming_row_and_column(cell, words):
    df = pd.DataFrame({"text": ["a", "b"], "toxic": [1, 1], "obscene": [0, cell], "threat": [0, 0]})
    with pytest.raises(DataError) as e:
        to_split(df, "x.csv", "text", "label", 3, label_columns=COLS)
    assert str(e.value).startswith("x.csv: ") and words in str(e.value) and "\n" not in str(e.value)


def test_a_missing_label_column_or_a_row_without_labels_is_one_data_error():
    df = pd.DataFrame({"text": ["a", "b", "c"], "toxic": [1, 0, 0], "obscene": [0, 0, 1]})
    with pytest.raises(DataError, match=r"^x.csv: no 'threat' column \(columns: 'text', 'toxic', 'obscene'\)$"):
        to_split(df, "x.csv", "text", "label", 3, label_columns=COLS)
    df["threat"] = 0
    with pytest.raises(DataError) as e:  # an all-zero row: an empty label set, as '' is with label_delimiter
        to_split(df, "x.csv", "text", "label", 3, label_columns=COLS)
    assert str(e.value) == "x.csv: row 1: no labels (every one of the columns 'toxic', 'obscene', 'threat' is 0; " \
                           "1 such row(s))"
    # unlabelled tables (predict) need no label columns at all
    assert to_split(df[["text"]], "x.csv", "text", "label", 3, labelled=False, label_columns=COLS).labels is None


def test_load_data_reads_label_columns_from_csv_and_parquet(tmp_path):
    rng = np.random.default_rng(0)
    labels = (rng.random((40, 3)) < 0.4).astype(int)
    labels[labels.sum(1) == 0, 2] = 1
    df = pd.DataFrame({"text": [f"text {i}" for i in range(40)], **dict(zip(COLS, labels.T))})
    df.to_csv(tmp_path / "train.csv", index=False)
    df.astype({c: bool for c in COLS}).to_parquet(tmp_path / "test.parquet")  # a bool column, as parquet keeps it
    cfg = Config().replace(**{"model.problem_type": "multi", "model.num_labels": 3, "data.label_columns": COLS,
                              "data.train": str(tmp_path / "train.csv"), "data.test": str(tmp_path / "test.parquet"),
                              "data.val_fraction": 0.25})
    data = load_data(cfg)
    assert len(data["train"]) == 30 and len(data["val"]) == 10
    assert data["test"].labels.tolist() == labels.tolist()
    assert sorted(data["train"].labels.tolist() + data["val"].labels.tolist()) == sorted(labels.tolist())
    df["threat"] = df["threat"].astype(object)
    df.loc[7, "threat"] = "yes"
    df.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataError, match=r"train.csv: row 7, column 'threat': 'yes' is not 0 or 1"):
        load_data(cfg)


def test_label_columns_from_flags_and_yaml(tmp_path):
    args = build_parser().parse_args(["train", "--model.problem_type", "multi", "--model.num_labels", "3",
                                      "--data.label_columns", "toxic, obscene,threat"])
    assert from_flags(args).data.label_columns == COLS
    (tmp_path / "c.yaml").write_text("model: {problem_type: multi, num_labels: 3}\n"
                                     "data: {label_columns: [toxic, obscene, threat]}\n")
    cfg = Config.from_yaml(tmp_path / "c.yaml")
    assert cfg.data.label_columns == COLS and Config.from_yaml(tmp_path / "c.yaml").run_id == cfg.run_id
    assert Config.from_dict(cfg.to_dict()) == cfg  # a run folder's config.yaml reads back the same


@pytest.mark.parametrize("overrides, words", [
    ({"data.label_columns": COLS}, "data.label_columns applies to model.problem_type multi only"),
    ({"model.problem_type": "multi", "data.label_columns": COLS},  # num_labels is 4 by default
     "data.label_columns names 3 column(s) for 4 labels (model.num_labels): one column per label"),
    ({"model.problem_type": "multi", "model.num_labels": 2, "data.label_columns": COLS},
     "data.label_columns names 3 column(s) for 2 labels"),
    ({"model.problem_type": "multi", "model.num_labels": 3, "data.label_columns": ["a", "b", "a"]},
     "data.label_columns names a column twice"),
])
def test_label_columns_are_checked_against_the_problem_type_and_num_labels(overrides, words):
    with pytest.raises(ConfigError) as e:
        Config().replace(**overrides)
    assert words in str(e.value) and "\n" not in str(e.value)


def test_label_columns_name_the_classes_and_leave_other_run_ids_alone():
    plain, multi = Config(), Config().replace(**{"model.problem_type": "multi", "model.num_labels": 3})
    named = multi.replace(**{"data.label_columns": COLS})
    assert class_names(named) == COLS and class_names(plain) == ["World", "Sports", "Business", "Sci/Tech"]
    assert class_names(multi.replace(**{"data.label_columns": [0, 1, 2]})) == ["0", "1", "2"]
    assert class_names(multi.replace(**{"data.train": "mine.csv"})) == ["0", "1", "2"]
    assert plain.replace(**{"data.label_columns": []}).run_id == plain.run_id
    assert multi.replace(**{"data.label_columns": []}).run_id == multi.run_id
    assert multi.replace(**{"data.label_columns": COLS}).run_id != multi.run_id


def test_sampling_and_validation_split_take_label_sets():
    rng = np.random.default_rng(0)
    labels = (rng.random((60, 4)) < 0.4).astype(np.int64)
    labels[labels.sum(1) == 0, 0] = 1
    idx = stratified_indices(labels, 20, seed=1)
    assert len(idx) == 20 and len(set(idx.tolist())) == 20
    assert (idx == stratified_indices(labels, 20, seed=1)).all()  # seeded
    train, val = train_val_split(Split([str(i) for i in range(60)], labels), 0.2, seed=3)
    assert len(train) == 48 and len(val) == 12 and val.labels.shape == (12, 4)
    assert not set(train.texts) & set(val.texts)


# -- config -------------------------------------------------------------------------------------------------------
def test_run_ids_of_existing_configs_do_not_change():
    assert Config.from_yaml("minilm-default").replace(**PUBLISHED).run_id == "a18e192f1c"
    plain = Config()
    assert plain.replace(**{"model.problem_type": "single", "data.label_delimiter": ";"}).run_id == plain.run_id
    assert plain.replace(**{"model.problem_type": "multi"}).run_id != plain.run_id


@pytest.mark.parametrize("overrides, words", [
    ({"model.problem_type": "both"}, "model.problem_type must be one of single, multi"),
    ({"train.class_weights": "auto"}, "train.class_weights applies to model.problem_type single only"),
    ({"train.loss": "focal"}, "train.loss focal applies to model.problem_type single only"),
    ({"train.label_smoothing": 0.1}, "train.label_smoothing applies"),
    ({"filter.dedup_exact": True}, "filter settings apply"),
    ({"data.label_delimiter": " "}, "data.label_delimiter must not be empty"),
])
def test_multi_refuses_single_label_settings(overrides, words):
    with pytest.raises(ConfigError, match=words):
        Config().replace(**{"model.problem_type": "multi", **overrides})


# -- metrics ------------------------------------------------------------------------------------------------------
def test_metrics_match_hand_computation():
    gold = np.array([[1, 0, 1], [0, 1, 0], [1, 1, 0], [0, 0, 1]])
    probs = np.array([[0.9, 0.2, 0.7], [0.6, 0.8, 0.1], [0.7, 0.4, 0.2], [0.1, 0.3, 0.4]])
    m = multilabel_metrics(_logit(probs), gold)  # 0.5 each
    # predicted: [1,0,1] [1,1,0] [1,0,0] [0,0,0]: rows 0 exact only
    assert m["accuracy"] == m["subset_accuracy"] == 0.25
    # label 0: tp 2 fp 1 fn 0 -> 4/5; label 1: tp 1 fp 0 fn 1 -> 2/3; label 2: tp 1 fp 0 fn 1 -> 2/3
    assert m["per_label_f1"] == pytest.approx([0.8, 2 / 3, 2 / 3], abs=1e-6)
    assert m["macro_f1"] == pytest.approx((0.8 + 4 / 3) / 3)
    assert m["micro_f1"] == pytest.approx(2 * 4 / (2 * 4 + 1 + 2))  # tp 4, fp 1, fn 2
    bce = -(gold * np.log(probs) + (1 - gold) * np.log(1 - probs)).mean()
    assert m["loss"] == pytest.approx(bce)
    assert TASKS["multi"].metrics(_logit(probs), gold, 3) == m  # what the loop and `evaluate` call


def test_thresholds_are_tuned_per_label_on_validation():
    gold = np.array([[1, 0], [1, 0], [0, 1], [0, 0]])
    probs = np.array([[0.30, 0.91], [0.22, 0.91], [0.10, 0.96], [0.15, 0.92]])
    t = tune_thresholds(_logit(probs), gold)
    # label 0: F1 is 1 for thresholds in (0.15, 0.22]: 0.2 is the one grid point; label 1: any threshold up to 0.9
    # predicts all four rows (F1 2/5), 0.95 only its one positive row (F1 1): 0.95 wins
    assert t == [0.2, 0.95]
    # a label validation never shows keeps 0.5 (every threshold scores F1 0)
    assert tune_thresholds(_logit(probs), np.array([[1, 0]] * 4))[1] == 0.5
    m = multilabel_metrics(_logit(probs), gold, t)
    assert m["thresholds"] == [0.2, 0.95] and m["subset_accuracy"] == 1.0 and m["macro_f1"] == 1.0


def test_loss_counts_and_formats():
    import torch

    logits, targets = torch.tensor([[0.0, 2.0]]), torch.tensor([[1, 0]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
    assert MultiLabelLoss()(logits, targets).item() == pytest.approx(expected.item())
    assert TASKS["multi"].label_counts(np.array([[1, 1, 0], [0, 1, 0]]), 3) == [1, 2, 0]
    assert TASKS["single"].label_counts(np.array([2, 0, 2]), 3) == [1, 0, 2]
    assert format_sets(np.array([[0, 1, 1], [0, 0, 0], [1, 0, 0]])) == ["1;2", "", "0"]


# -- end to end ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def multi_csvs(tmp_path_factory, agnews_dir):
    """AG News rows joined in pairs of different classes (each pair carries both labels), mixed with single rows."""
    df = pd.read_csv(agnews_dir / "train.csv.gz").groupby("label").head(60).sample(frac=1, random_state=0)
    rows, texts, labels = [], df.text.tolist(), df.label.tolist()
    for i in range(0, len(df) - 1, 2):
        if i % 4 == 0 and labels[i] != labels[i + 1]:
            rows.append((texts[i] + " " + texts[i + 1], f"{labels[i]};{labels[i + 1]}"))
        else:
            rows += [(texts[i], str(labels[i])), (texts[i + 1], str(labels[i + 1]))]
    data = pd.DataFrame(rows, columns=["text", "label"])
    root = tmp_path_factory.mktemp("multi")
    data.iloc[40:].to_csv(root / "train.csv", index=False)
    data.iloc[:40].to_csv(root / "test.csv", index=False)
    data.iloc[:25][["text"]].to_csv(root / "unlabelled.csv", index=False)
    assert data.label.str.contains(";").sum() >= 20
    return root


@pytest.mark.slow
def test_multi_label_run_end_to_end(tmp_path, multi_csvs):
    from budgetlora.inference.classifier import load

    runs_root, out = tmp_path / "runs", tmp_path / "pred.csv"
    flags = ["--model.problem_type", "multi", "--data.train", str(multi_csvs / "train.csv"),
             "--data.test", str(multi_csvs / "test.csv"), "--data.val_fraction", "0.2", "--model.max_length", "32",
             "--train.max_steps", "6", "--train.eval_every", "3", "--train.batch_size", "16", "--train.lr", "5e-3"]
    assert main(["train", *flags, "--runs", str(runs_root)]) == 0
    (run,) = [p for p in runs_root.iterdir() if (p / "metrics.json").is_file()]
    m = json.loads((run / "metrics.json").read_text())
    assert m["problem_type"] == "multi" and len(m["thresholds"]) == 4
    assert all(0.05 <= t <= 0.95 for t in m["thresholds"])
    for key in ("val_accuracy", "test_accuracy", "test_subset_accuracy", "test_micro_f1", "test_macro_f1",
                "test_per_label_f1", "val_loss", "test_loss"):
        assert key in m
    assert m["test_accuracy"] == m["test_subset_accuracy"] and m["test_rows"] == 40
    assert "test_confusion_matrix" not in m and not (run / "test_predictions.csv").exists()
    assert (run / "README.md").is_file() and (run / "plots" / "summary.png").is_file()

    clf = load(run)  # the reload check compares logits, as for any run
    sets = clf.predict_sets(["Stocks rallied as oil fell.", "The team won the final."])
    assert len(sets) == 2 and all(set(s) <= {0, 1, 2, 3} for s in sets)

    assert main(["predict", str(run), "--input", str(multi_csvs / "unlabelled.csv"), "--output", str(out)]) == 0
    pred = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(pred.columns) == ["ID", "Labels"] and len(pred) == 25
    assert all(c == "" or all(x in "0123" for x in c.split(";")) for c in pred.Labels)
    assert main(["predict", str(run), "--input", str(multi_csvs / "unlabelled.csv"), "--output", str(out),
                 "--top-k", "2"]) == 2
    assert main(["evaluate", str(run), "--input", str(multi_csvs / "test.csv")]) == 0


@pytest.mark.slow
def test_a_run_on_label_columns_is_named_by_them_and_served_with_sets(tmp_path, multi_csvs):
    from fastapi.testclient import TestClient

    from budgetlora.inference.classifier import load
    from budgetlora.inference.serve import create_app

    names = ["world", "sports", "business", "tech"]
    for split in ("train", "test"):
        df = pd.read_csv(multi_csvs / f"{split}.csv", dtype=str)
        for k, name in enumerate(names):
            df[name] = df.label.map(lambda cell: int(str(k) in cell.split(";")))
        df.drop(columns="label").to_csv(tmp_path / f"{split}.csv", index=False)
    flags = ["--model.problem_type", "multi", "--data.label_columns", ",".join(names),
             "--data.train", str(tmp_path / "train.csv"), "--data.test", str(tmp_path / "test.csv"),
             "--data.val_fraction", "0.2", "--model.max_length", "32", "--train.max_steps", "4",
             "--train.eval_every", "2", "--train.batch_size", "16"]
    assert main(["train", *flags, "--runs", str(tmp_path / "runs")]) == 0
    (run,) = [p for p in (tmp_path / "runs").iterdir() if (p / "metrics.json").is_file()]
    m = json.loads((run / "metrics.json").read_text())
    assert m["class_names"] == names and m["test_rows"] == 40
    assert "| sports |" in (run / "README.md").read_text()  # the card's per-label table

    clf = load(run)
    texts = ["Stocks rallied as oil fell.", "The team won the final."]
    with TestClient(create_app(clf)) as client:
        body = client.post("/predict", json={"texts": texts}).json()
    assert body["label_sets"] == clf.predict_sets(texts)
    assert body["class_sets"] == [[names[i] for i in s] for s in body["label_sets"]]

    # an ONNX export carries the thresholds, so its service answers the same sets
    from budgetlora.inference.export import export_onnx
    from budgetlora.inference.onnx_serve import load_onnx

    info = export_onnx(run, tmp_path / "onnx")
    assert info["thresholds"] == m["thresholds"] and info["class_names"] == names
    onnx = load_onnx(tmp_path / "onnx")
    assert onnx.predict_sets(texts) == body["label_sets"]
    with TestClient(create_app(onnx)) as client:
        assert client.post("/predict", json={"texts": texts}).json()["class_sets"] == body["class_sets"]


# -- the task is chosen once, from the config ------------------------------------------------------------------------
def test_the_task_comes_from_the_config_and_decides_answers_and_columns():
    single, multi = task_of(Config()), task_of(Config().replace(**{"model.problem_type": "multi"}))
    assert (single.name, single.sets, single.answer_column) == ("single", False, "Label")
    assert (multi.name, multi.sets, multi.answer_column) == ("multi", True, "Labels")
    logits = _logit(np.array([[0.9, 0.2, 0.7], [0.1, 0.3, 0.4]]))
    assert single.decide(logits, {}).tolist() == [0, 2]  # argmax
    settings = multi.settings({"thresholds": [0.5, 0.5, 0.35]}, 3, "run")
    assert multi.decide(logits, settings).tolist() == [[1, 0, 1], [0, 0, 1]]
    assert multi.answer_cells(multi.decide(logits, settings), "|") == ["0|2", "2"]
    with pytest.raises(Exception, match="no per-label thresholds"):
        multi.settings({"thresholds": [0.5]}, 3, "run")


def test_class_names_come_from_the_data_not_from_the_number_of_classes():
    """Four classes on the user's own file are not AG News: their names are the label ids."""
    own = Config().replace(**{"data.train": "mine.csv", "data.test": "mine_test.csv"})
    assert class_names(own) == ["0", "1", "2", "3"]
    assert class_names(own, stored=["a", "b", "c", "d"]) == ["a", "b", "c", "d"]  # what the run was reported with
    assert class_names(own, stored=["a"]) == ["0", "1", "2", "3"]  # names that do not fit are not used


def test_class_names_from_the_config_are_checked_and_leave_run_ids_alone():
    own = Config().replace(**{"data.train": "mine.csv"})
    named = own.replace(**{"data.class_names": ["a", "b", "c", "d"]})
    assert class_names(named) == ["a", "b", "c", "d"] and class_names(own) == ["0", "1", "2", "3"]
    assert own.replace(**{"data.class_names": []}).run_id == own.run_id
    for bad, words in ((["a", "b"], "names 2 class(es) for 4"), (["a", "a", "b", "c"], "names a class twice")):
        with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
            own.replace(**{"data.class_names": bad})
