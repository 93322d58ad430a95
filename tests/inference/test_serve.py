"""The HTTP service on a real loopback socket: answers match the Python API, bad requests are refused with 4xx
without harming the service, and concurrent requests are merged into shared forward passes."""
from __future__ import annotations

import asyncio
import json

import httpx
import numpy as np
import pytest
import uvicorn

import budgetlora
from budgetlora import runs
from budgetlora.cli import main
from budgetlora.config.use import ServeConfig
from budgetlora.errors import ConfigError
from budgetlora.inference.serve import MicroBatcher, create_app
from tests.inference.servers import uvicorn_thread

MAX_TEXTS, MAX_CHARS, MAX_BODY = 8, 300, 8_000
TEXTS = ["Stocks fell sharply as oil prices climbed to a record high.",
         "The home team won the championship in extra time.",
         "A new chip doubles battery life in laptops, the company said.",
         "Leaders met in Geneva to discuss the ceasefire.",
         "Quarterly profit beat analyst forecasts."]


@pytest.fixture(scope="module")
def classifier(tiny_run):
    return budgetlora.load(tiny_run)


@pytest.fixture(scope="module")
def server(classifier):
    """The app under uvicorn in a background thread on a free loopback port; yields (base url, app)."""
    app = create_app(classifier, ServeConfig(max_batch=64, max_texts=MAX_TEXTS, max_chars=MAX_CHARS,
                                             max_body_bytes=MAX_BODY, batch_wait_ms=10))
    with uvicorn_thread(app) as url:
        yield url, app


def _ok(url: str) -> None:
    r = httpx.get(f"{url}/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}
    r = httpx.post(f"{url}/predict", json={"texts": TEXTS[:1]})
    assert r.status_code == 200 and len(r.json()["labels"]) == 1


def test_api_predictions(classifier):
    probs = classifier.predict_proba(TEXTS)
    assert probs.shape == (len(TEXTS), 4)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-5)
    assert classifier.predict(TEXTS) == probs.argmax(axis=1).tolist()
    assert classifier.class_names == ["0", "1", "2", "3"]  # trained on a CSV of its own: its ids name the classes
    assert classifier.predict([]) == []
    with pytest.raises(TypeError):
        classifier.predict("one string, not a list")


def test_predict_matches_python_api(server, classifier):
    url, _ = server
    r = httpx.post(f"{url}/predict", json={"texts": TEXTS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["labels"] == classifier.predict(TEXTS)
    assert body["classes"] == [classifier.class_names[i] for i in body["labels"]]
    np.testing.assert_allclose(body["probabilities"], classifier.predict_proba(TEXTS), atol=1e-5)


def test_info_health_and_schema(server, tiny_run):
    url, _ = server
    info = httpx.get(f"{url}/info").json()
    metrics = runs.read_json(tiny_run / runs.METRICS)
    adapter = runs.read_json(tiny_run / "adapter_config.json")
    assert info["base_model"]["name"] == "minilm"
    assert info["adapter_config"]["r"] == adapter["r"]
    assert info["trainable_params"] == metrics["trainable_params"] > 0
    assert info["metrics"]["test_accuracy"] == metrics["test_accuracy"]
    assert info["limits"]["max_texts"] == MAX_TEXTS
    schema = httpx.get(f"{url}/openapi.json").json()
    assert "/predict" in schema["paths"]
    texts = schema["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert texts["maxItems"] == MAX_TEXTS and texts["items"]["maxLength"] == MAX_CHARS
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}


BAD_BODIES = {
    "not json": b"{texts: nope",
    "json but not an object": b'["a"]',
    "texts not a list": b'{"texts": "a"}',
    "number in texts": b'{"texts": ["a", 3]}',
    "missing texts": b'{}',
    "unknown field": b'{"texts": ["a"], "extra": 1}',
    "empty list": b'{"texts": []}',
    "too many texts": json.dumps({"texts": ["a"] * (MAX_TEXTS + 1)}).encode(),
    "too long text": json.dumps({"texts": ["x" * (MAX_CHARS + 1)]}).encode(),
    "empty text": b'{"texts": [""]}',
    "blank text": b'{"texts": ["  \\n "]}',
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_bad_request_is_refused_and_service_survives(server, case):
    url, _ = server
    r = httpx.post(f"{url}/predict", content=BAD_BODIES[case], headers={"content-type": "application/json"})
    assert r.status_code == 422, (case, r.status_code, r.text)
    assert r.json()["error"]  # one readable line, not only pydantic's list
    _ok(url)


def test_oversized_body_gets_413(server):
    url, _ = server
    big = json.dumps({"texts": ["y" * MAX_CHARS] * 40}).encode()
    assert len(big) > MAX_BODY
    r = httpx.post(f"{url}/predict", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]

    def chunks():  # no Content-Length: the limit must hold on the bytes actually received
        for i in range(0, len(big), 1000):
            yield big[i:i + 1000]

    r = httpx.post(f"{url}/predict", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413
    _ok(url)


def test_wrong_method_and_content_type(server):
    url, _ = server
    assert httpx.get(f"{url}/predict").status_code == 405
    r = httpx.post(f"{url}/predict", content=b"hello", headers={"content-type": "text/plain"})
    assert 400 <= r.status_code < 500
    _ok(url)


@pytest.mark.slow
def test_concurrent_requests_are_merged(server, classifier):
    url, app = server
    n = 50
    batches = [[TEXTS[(i + j) % len(TEXTS)] + f" #{i}" for j in range(1 + i % 3)] for i in range(n)]
    expected = [classifier.predict(b) for b in batches]
    before = dict(app.state.batcher.stats.as_dict())

    async def go():
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            return await asyncio.gather(*(client.post("/predict", json={"texts": b}) for b in batches))

    responses = asyncio.run(go())
    assert all(r.status_code == 200 for r in responses)
    assert [r.json()["labels"] for r in responses] == expected
    after = httpx.get(f"{url}/info").json()["batching"]
    passes = after["forward_passes"] - before["forward_passes"]
    assert after["requests"] - before["requests"] == n
    assert after["texts"] - before["texts"] == sum(map(len, batches))
    assert passes < n and after["merged_passes"] > before["merged_passes"], after


def test_batcher_splits_results_and_survives_a_failed_pass():
    calls = []

    def fn(requests):  # each request's rows: its texts' lengths
        texts = [t for _, ts in requests for t in ts]
        calls.append(texts)
        if "boom" in texts:
            raise RuntimeError("forward pass failed")
        return [np.array([[len(t)] for t in ts]) for _, ts in requests]

    async def go():
        b = MicroBatcher(fn, max_batch=4, wait_s=0.05)
        b.start()
        results = await asyncio.gather(b.submit(["a", "bb"]), b.submit(["ccc"]), b.submit(["dddd", "e"]))
        failed = await asyncio.gather(b.submit(["boom"]), return_exceptions=True)
        later = await b.submit(["ffffff"])
        await b.stop()
        return results, failed[0], later, b.stats

    results, failed, later, stats = asyncio.run(go())
    assert results[0].ravel().tolist() == [1, 2] and results[1].ravel().tolist() == [3]
    assert results[2].ravel().tolist() == [4, 1]
    assert isinstance(failed, RuntimeError)
    assert later.ravel().tolist() == [6]
    assert all(len(c) <= 4 for c in calls)  # max_batch is never exceeded by merging
    assert calls[0] == ["a", "bb", "ccc"]  # the third request would overflow max_batch, so it starts the next pass
    assert stats.merged_passes >= 1


def test_serve_settings_from_yaml_and_flags_reach_the_app(tiny_run, tmp_path, monkeypatch):
    """`serve --config FILE` reads the file's serve: section and the flags override it; what the app enforces and
    reports is exactly that, with no second set of defaults in between."""
    started = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: started.update(app=app, **kw))
    yaml = tmp_path / "serve.yaml"
    yaml.write_text("serve:\n  max_texts: 3\n  max_chars: 50\n  port: 8123\n")
    assert main(["serve", str(tiny_run), "--config", str(yaml), "--max-chars", "40", "--batch-wait-ms", "0"]) == 0
    app = started["app"]
    assert started["port"] == 8123 and started["host"] == "127.0.0.1"
    settings = app.state.settings
    assert (settings.max_texts, settings.max_chars, settings.batch_wait_ms) == (3, 40, 0.0)
    texts = app.openapi()["components"]["schemas"]["PredictRequest"]["properties"]["texts"]
    assert texts["maxItems"] == 3 and texts["items"]["maxLength"] == 40
    assert settings.limits["max_body_bytes"] == 3 * (4 * 40 + 8) + 4096  # derived from the two when left at 0


def test_serve_settings_are_checked_in_one_place():
    assert ServeConfig().limits == {"max_batch": 64, "max_texts": 256, "max_chars": 10_000,
                                    "max_body_bytes": 256 * (4 * 10_000 + 8) + 4096, "batch_wait_ms": 2.0}
    for bad, message in [({"max_batch": 0}, "serve.max_batch"), ({"batch_wait_ms": -1.0}, "serve.batch_wait_ms"),
                         ({"backend": "tf"}, "torch, onnx"), ({"port": 70_000}, "serve.port")]:
        with pytest.raises(ConfigError, match=message):
            ServeConfig(**bad)

