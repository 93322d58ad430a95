"""Several runs in one server: runs on one base share it and answer with their own adapters and heads, exactly as
each run's own server does; requests to different runs in one micro-batch share a forward pass (LoRA) or are
grouped per run; a request names its run, and an unknown name is a 404."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
from urllib.parse import quote

import numpy as np
import pytest
import uvicorn
from fastapi.testclient import TestClient

import budgetlora
from budgetlora import runs
from budgetlora.cli import main
from budgetlora.config.use import ServeConfig
from budgetlora.errors import ConfigError
from budgetlora.inference import classifier as classifier_mod
from budgetlora.inference.classifier import load_many
from budgetlora.inference.page import render
from budgetlora.inference.serve import create_app
from budgetlora.inference.served import ServedRuns, run_folders
from tests.conftest import tiny_config
from tests.inference.servers import uvicorn_thread
from tests.inference.test_serve import TEXTS



@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, small_csvs, tiny_run):
    """The shared tiny run and a second one on the same base (another seed, rank and length), in one folder."""
    from budgetlora.training.train import train

    root = tmp_path_factory.mktemp("many")
    second = train(tiny_config(small_csvs, **{"train.seed": 7, "lora.r": 4, "model.max_length": 24,
                                              "train.lr": 1e-2}), root=root)
    first = root / tiny_run.name
    shutil.copytree(tiny_run, first)
    return first, second


@pytest.fixture(scope="module")
def served(two_runs):
    return ServedRuns(load_many(list(two_runs)))


def test_runs_on_one_base_share_it_and_keep_their_own_heads(served, two_runs):
    a, b = (r.classifier for r in served.runs)
    assert a.run.model is b.run.model  # one base in memory
    assert a.run.adapter == "default" and b.run.adapter.endswith(b.run.cfg.run_id)
    heads = [dict(a.run.model.named_parameters())[f"base_model.model.classifier.modules_to_save.{n}.weight"]
             for n in (a.run.adapter, b.run.adapter)]
    assert heads[0].data_ptr() != heads[1].data_ptr() and not np.allclose(heads[0].detach(), heads[1].detach())
    for c, run in zip((a, b), two_runs):  # each answers as the run loaded on its own
        alone = budgetlora.load(run)
        np.testing.assert_allclose(c.logits(TEXTS), alone.logits(TEXTS), atol=1e-5)
    assert a.predict_proba(TEXTS).argmax(1).tolist() != b.predict_proba(TEXTS).argmax(1).tolist() or \
        not np.allclose(a.logits(TEXTS), b.logits(TEXTS), atol=1e-2)  # two different models, not one twice


def test_a_mixed_batch_equals_the_per_adapter_answers(served, monkeypatch):
    group = served.runs[0].group
    assert group.mixed and group is served.runs[1].group, served.batching()
    calls = []
    real = classifier_mod.mixed_logits
    monkeypatch.setattr(classifier_mod, "mixed_logits", lambda req: calls.append(len(req)) or real(req))
    a, b = served.runs
    requests = [(a, TEXTS[:2]), (b, TEXTS), (a, TEXTS[2:]), (b, TEXTS[:1])]
    got = served.logits(requests)
    assert calls == [2]  # one forward pass for both runs' texts
    for (run, texts), rows in zip(requests, got):
        np.testing.assert_allclose(rows, run.classifier.logits(texts), atol=1e-4)
    # grouped per run when mixing is off: the same answers, one pass per run
    calls.clear()
    grouped = ServedRuns([r.classifier for r in served.runs], mix=False)
    assert not grouped.groups[0].mixed and grouped.batching()[0]["why_not"]
    for rows, again in zip(got, grouped.logits([(grouped.runs[served.runs.index(r)], t) for r, t in requests])):
        np.testing.assert_allclose(rows, again, atol=1e-4)
    assert calls == []


def test_the_server_answers_each_request_with_the_run_it_names(served, two_runs):
    alone = [TestClient(create_app(budgetlora.load(run), ServeConfig(batch_wait_ms=1))) for run in two_runs]
    with TestClient(create_app(served, ServeConfig(batch_wait_ms=1))) as client, alone[0] as c0, alone[1] as c1:
        for run, single in zip(served.runs, (c0, c1)):
            for name in (run.name, *run.aliases):
                r = client.post("/predict", json={"texts": TEXTS, "model": name})
                assert r.status_code == 200, r.text
                body, expected = r.json(), single.post("/predict", json={"texts": TEXTS}).json()
                assert body["model"] == run.name and body["labels"] == expected["labels"]
                np.testing.assert_allclose(body["probabilities"], expected["probabilities"], atol=1e-5)
        first = client.post("/predict", json={"texts": TEXTS}).json()  # naming none: the first run
        assert first["model"] == served.runs[0].name
        r = client.post("/predict", json={"texts": TEXTS, "model": "no-such-run"})
        assert r.status_code == 404 and all(run.name in r.json()["error"] for run in served.runs)
        for bad in (7, ["a"], "x" * 201):  # not a name: refused by the schema, one line
            r = client.post("/predict", json={"texts": TEXTS, "model": bad})
            assert r.status_code == 422 and r.json()["error"].startswith("model"), r.text
        info = client.get("/info").json()
        assert [m["model"] for m in info["models"]] == [r.name for r in served.runs]
        assert info["default_model"] == served.runs[0].name and info["run_id"] == served.runs[0].name
        assert info["batching"]["groups"] == [{"models": [r.name for r in served.runs], "mixed": True}]
        page = client.get("/").text
        assert all(r.name in page for r in served.runs) and '<select id="model"' in page


def test_concurrent_requests_to_two_runs_share_a_pass_and_get_their_own_answers(served):
    app = create_app(served, ServeConfig(max_batch=64, batch_wait_ms=200))
    a, b = served.runs
    expected = {r.name: r.classifier.predict_proba(TEXTS) for r in served.runs}

    async def go():
        async with app.router.lifespan_context(app):
            batcher = app.state.batcher
            got = await asyncio.gather(*[batcher.submit(TEXTS, r) for r in (a, b, a, b)])
            return got, batcher.stats

    got, stats = asyncio.run(go())
    assert stats.mixed_model_passes >= 1 and stats.forward_passes < 4, stats
    for run, rows in zip((a, b, a, b), got):
        np.testing.assert_allclose(np.exp(rows) / np.exp(rows).sum(1, keepdims=True), expected[run.name], atol=1e-5)


def test_a_folder_of_runs_and_the_same_run_twice(two_runs, tmp_path):
    root = two_runs[1].parent
    assert run_folders([root]) == sorted(two_runs, key=lambda p: p.name)
    assert run_folders([two_runs[0], two_runs[0], root])[0] == two_runs[0]  # given twice: served once
    copy = tmp_path / "copy"
    shutil.copytree(two_runs[0], copy)
    with pytest.raises(ConfigError, match="are the same run"):  # refused before anything loads
        run_folders([two_runs[0], copy])
    with pytest.raises(ConfigError, match="are the same run"):
        ServedRuns(load_many([two_runs[0], copy], verify=False))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a run folder"):
        run_folders([tmp_path / "empty"])


def test_serve_takes_several_runs_on_the_command_line(two_runs, monkeypatch, capsys):
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app))
    assert main(["serve", str(two_runs[0]), str(two_runs[1])]) == 0
    served = started["app"].state.served
    assert [r.classifier.path for r in served.runs] == list(two_runs)
    assert "requests mixed in one forward pass" in capsys.readouterr().out
    assert main(["serve", str(two_runs[1].parent)]) == 0  # a folder of runs: every run in it
    assert len(started["app"].state.served.runs) == 2


def test_the_page_lists_the_runs_and_escapes_them():
    info = {"models": [{"model": "aaa", "run_id": "aaa", "name": "first", "class_names": ["A", "B"]},
                       {"model": "bbb", "run_id": "bbb", "name": "<b>x</b>", "class_names": ["C", "D", "E"]}]}
    html = render(info)
    assert '<h1 id="run">first</h1>' in html and "<b>x</b>" not in html and "&lt;b&gt;x&lt;/b&gt;" in html
    assert "&quot;bbb&quot;" in html and "&quot;E&quot;" in html


@pytest.mark.slow
def test_the_page_classifies_with_the_run_picked_in_headless_chromium(served, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed: run .ci/setup-chromium.sh")
        pytest.skip("chromium not installed (run .ci/setup-chromium.sh)")
    text = TEXTS[2]
    b = served.runs[1]
    expected = b.classifier.class_names[b.classifier.predict([text])[0]]
    with uvicorn_thread(create_app(served, ServeConfig(batch_wait_ms=1))) as url:
        dom = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                              f"--user-data-dir={tmp_path / 'p'}", "--virtual-time-budget=10000", "--dump-dom",
                              f"{url}/?model={b.name}&text={quote(text)}"],
                             capture_output=True, text=True, timeout=120, check=False).stdout
    assert re.search(r'<div id="result" data-state="done"', dom), dom[:500]
    assert re.search(rf'<h1 id="run">{b.name}</h1>', dom) or b.classifier.run.cfg.name in dom
    assert re.search(r'<div id="predicted">([^<]*)</div>', dom).group(1) == expected
    assert len(re.findall(r'class="bar"', dom)) == len(b.classifier.class_names)


def test_only_runs_that_keep_what_they_train_to_themselves_share_a_model(two_runs):
    from budgetlora.inference.load import share_key

    a, b = two_runs
    cfg = runs.load_config(a)
    lora = {"peft_type": "LORA", "bias": "none"}
    assert share_key(cfg, lora, a) == share_key(cfg, lora, b)
    assert share_key(cfg, {"peft_type": "IA3"}, a) == share_key(cfg, {"peft_type": "IA3"}, b)
    assert share_key(cfg, lora, a) != share_key(cfg, {"peft_type": "IA3"}, a)  # one kind per peft model
    # trained base biases are the base's own weights; VeRA shares its projections across adapters
    for own in ({"peft_type": "LORA", "bias": "all"}, {"peft_type": "VERA"}, {"peft_type": "ADALORA"}):
        assert share_key(cfg, own, a) != share_key(cfg, own, b), own
    other = cfg.replace(**{"model.num_labels": 3})
    assert share_key(other, lora, a) != share_key(cfg, lora, a)


def test_two_threads_on_runs_of_one_model_each_get_their_own_answers(served):
    import threading

    a, b = (r.classifier for r in served.runs)
    expected = {id(c): c.logits(TEXTS) for c in (a, b)}
    wrong = []

    def ask(c):
        for _ in range(15):
            if not np.allclose(c.logits(TEXTS), expected[id(c)], atol=1e-5):
                wrong.append(c.run.adapter)

    threads = [threading.Thread(target=ask, args=(c,)) for c in (a, b, a, b)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not wrong
