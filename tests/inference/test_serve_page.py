"""The page `serve` answers at GET /: self-contained, naming the run and its budget, and, in a real headless
browser, classifying a text through POST /predict on a real loopback socket."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from html import escape
from urllib.parse import quote

import httpx
import pytest

import budgetlora
from budgetlora.config.use import ServeConfig
from budgetlora.inference.page import render
from budgetlora.inference.serve import create_app
from tests.inference.servers import uvicorn_thread

TEXT = "The home team won the championship in extra time & the fans sang <all night>."


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def classifier(tiny_run):
    return budgetlora.load(tiny_run)


@pytest.fixture(scope="module")
def server(classifier):
    """The app under uvicorn in a background thread on a free loopback port; yields its base url."""
    with uvicorn_thread(create_app(classifier, ServeConfig(batch_wait_ms=1))) as url:
        yield url


def test_render_escapes_what_comes_from_the_run():
    html = render({"name": "<script>alert(1)</script> {{meta}}", "run_id": "abc123", "trainable_params": 12345,
                   "metrics": {"budget": 50000}, "class_names": ['say "hi"</script>', "B"],
                   "base_model": {"name": "minilm"}})
    assert "<script>alert(1)" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; {{meta}}" in html
    assert 'say "hi"</script>' not in html and "&quot;say \\&quot;hi\\&quot;&lt;/script&gt;&quot;" in html
    assert "run abc123" in html and "12,345 trainable parameters (budget 50,000)" in html
    assert "{{" not in html.replace("{{meta}}", "")  # every marker filled, the name's own text left alone


def test_render_without_a_name_or_counts_uses_the_run_id():
    html = render({"run_id": "abc123", "class_names": ["A", "B"]})
    assert '<h1 id="run">abc123</h1>' in html and "trainable parameters not recorded" in html


@pytest.mark.slow
def test_page_names_the_run_and_loads_nothing_from_elsewhere(server):
    info = httpx.get(f"{server}/info").json()
    r = httpx.get(f"{server}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    html = r.text
    assert f'<h1 id="run">{escape(info["name"] or info["run_id"])}</h1>' in html
    assert f"{info['trainable_params']:,} trainable parameters (budget {info['metrics']['budget']:,})" in html
    assert not re.search(r"<(link|img|iframe)\b|\bsrc=|https?://|//cdn", html), "the page must be self-contained"
    policy = r.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "/" not in httpx.get(f"{server}/openapi.json").json()["paths"]  # the page is not part of the API
    body = httpx.post(f"{server}/predict", json={"texts": [TEXT]}).json()  # what the page's script reads
    assert set(body) >= {"labels", "classes", "probabilities"} and len(body["probabilities"][0]) == 4


@pytest.mark.slow
def test_page_classifies_a_text_in_headless_chromium(server, classifier, tmp_path):
    browser = _chromium()
    if browser is None:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("chromium is not installed: run .ci/setup-chromium.sh")
        pytest.skip("chromium not installed (run .ci/setup-chromium.sh)")
    expected = classifier.class_names[classifier.predict([TEXT])[0]]
    url = f"{server}/?text={quote(TEXT)}"  # the page classifies a text given in its address as it opens
    base = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--window-size=900,700",
            "--virtual-time-budget=10000"]
    dom = subprocess.run([*base, f"--user-data-dir={tmp_path / 'profile-dom'}", "--dump-dom", url],
                         capture_output=True, text=True, timeout=120, check=False).stdout
    state = re.search(r'<div id="result" data-state="(\w+)"', dom)
    assert state, f"the page did not load:\n{dom[:500]}"
    error = re.search(r'<div id="error">([^<]*)</div>', dom)
    assert state.group(1) == "done", f"state {state.group(1)}: {error.group(1) if error else dom[:500]}"
    predicted = re.search(r'<div id="predicted">([^<]*)</div>', dom)
    assert predicted and predicted.group(1) == escape(expected, quote=False), predicted
    assert "&amp; the fans sang &lt;all night&gt;.</textarea>" in dom  # the text arrived whole
    widths = [float(w) for w in re.findall(r'class="bar" style="width: ([\d.]+)%;"', dom)]
    assert len(widths) == 4 and abs(sum(widths) - 100) < 0.5, widths  # one bar per class, together the whole
    assert len(re.findall(r'class="row top"', dom)) == 1

    png = tmp_path / "page.png"
    subprocess.run([*base, f"--user-data-dir={tmp_path / 'profile-png'}", f"--screenshot={png}", url],
                   capture_output=True, text=True, timeout=120, check=False)
    assert png.is_file() and png.stat().st_size > 1000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
