"""`serve` for a multi-label run: each answer carries the label set taken at the run's per-label thresholds, exactly
as `Classifier.predict_sets` takes it, while a single-label answer keeps its three keys. The classifiers here are
the real `Classifier` around a stand-in for the loaded model (fixed logits per text), so no model is trained."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from budgetlora import runs
from budgetlora.config import Config
from budgetlora.config.use import ServeConfig
from budgetlora.errors import RunFolderError
from budgetlora.inference.classifier import Classifier
from budgetlora.inference.serve import answer, create_app
from budgetlora.tasks import softmax

NAMES = ["toxic", "obscene", "threat"]
THRESHOLDS = [0.5, 0.3, 0.9]


def _logit(p):
    p = np.asarray(p, dtype=np.float64)
    return np.log(p / (1 - p))


# per text, the probability of each label: reaching, missing or just over each threshold
PROBS = {"two labels": [0.6, 0.2, 0.95], "none": [0.4, 0.1, 0.5], "all": [0.51, 0.31, 0.91],
         "one": [0.1, 0.35, 0.2]}
SETS = {"two labels": [0, 2], "none": [], "all": [0, 1, 2], "one": [1]}


def _classifier(tmp_path, cfg: Config, metrics: dict) -> Classifier:
    """A real Classifier whose run answers fixed logits: what serve builds its answers from."""
    width = cfg.model.num_labels

    def logits(texts, exact=False):
        return np.array([_logit(PROBS[t])[:width] for t in texts], dtype=np.float32)

    runs.write_json(tmp_path / "adapter_config.json", {"r": 8})  # what /info reads beside the metrics
    return Classifier(SimpleNamespace(path=tmp_path, cfg=cfg, metrics=metrics, logits=logits))


@pytest.fixture
def multi(tmp_path) -> Classifier:
    cfg = Config().replace(**{"model.problem_type": "multi", "model.num_labels": 3, "data.label_columns": NAMES})
    return _classifier(tmp_path, cfg, {"thresholds": THRESHOLDS, "class_names": NAMES, "problem_type": "multi"})


def test_answer_takes_sets_at_each_labels_threshold():
    texts = list(PROBS)
    logits = np.array([_logit(PROBS[t]) for t in texts], dtype=np.float32)
    body = answer(logits, NAMES, THRESHOLDS)
    assert body["label_sets"] == [SETS[t] for t in texts]
    assert body["class_sets"] == [[NAMES[i] for i in SETS[t]] for t in texts]
    np.testing.assert_allclose(body["probabilities"], [PROBS[t] for t in texts], atol=1e-6)  # sigmoids, not softmax
    assert body["labels"] == logits.argmax(axis=1).tolist() and body["classes"][0] == "threat"
    single = answer(softmax(logits), NAMES)
    assert set(single) == {"labels", "classes", "probabilities"}


def test_serve_answers_a_multi_label_run_with_its_label_sets(multi):
    texts = list(PROBS)
    assert multi.thresholds == THRESHOLDS
    assert multi.predict_sets(texts) == [SETS[t] for t in texts]
    with TestClient(create_app(multi, ServeConfig(batch_wait_ms=1))) as client:
        r = client.post("/predict", json={"texts": texts})
        info = client.get("/info").json()
        page = client.get("/").text
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"model", "labels", "classes", "probabilities", "label_sets", "class_sets"}
    assert body["label_sets"] == multi.predict_sets(texts)
    assert body["class_sets"] == [["toxic", "threat"], [], ["toxic", "obscene", "threat"], ["obscene"]]
    np.testing.assert_allclose(body["probabilities"], [PROBS[t] for t in texts], atol=1e-6)
    assert body["classes"] == [NAMES[i] for i in body["labels"]]
    assert info["class_names"] == NAMES
    assert "body.label_sets" in page and "toxic" in page  # the page shows the set when the answer has one


def test_single_label_answers_keep_their_three_keys(tmp_path):
    clf = _classifier(tmp_path, Config().replace(**{"model.num_labels": 3}), {})
    assert clf.thresholds is None
    texts = ["two labels", "none"]
    with TestClient(create_app(clf, ServeConfig(batch_wait_ms=1))) as client:
        body = client.post("/predict", json={"texts": texts}).json()
    assert set(body) == {"model", "labels", "classes", "probabilities"}
    assert body["labels"] == clf.predict(texts) and body["classes"] == [clf.class_names[i] for i in body["labels"]]
    np.testing.assert_allclose(body["probabilities"], clf.predict_proba(texts), atol=1e-6)
    np.testing.assert_allclose(np.sum(body["probabilities"], axis=1), 1.0, atol=1e-5)


def test_a_multi_label_run_without_thresholds_is_refused_before_serving(tmp_path):
    cfg = Config().replace(**{"model.problem_type": "multi", "model.num_labels": 3})
    for metrics in ({}, {"thresholds": [0.5, 0.5]}):
        with pytest.raises(RunFolderError, match="no per-label thresholds"):
            create_app(_classifier(tmp_path, cfg, metrics))
