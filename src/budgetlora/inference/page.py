"""The page `serve` answers at GET /: a text box whose text is classified through POST /predict, shown as the
predicted class (for a multi-label run, the predicted label set) and one probability bar per class, under the run's
name and its trainable-parameter budget. A server holding several runs offers them in a list (`/?model=RUN_ID`
picks one as the page opens).

Self-contained (inline style and script, nothing fetched but /predict), so it works on a machine without internet
access; `/?text=...` classifies that text as the page opens, which makes a result linkable."""
from __future__ import annotations

import json
import re
from html import escape

# the policy the page is sent with: nothing loads from elsewhere, and the only request it may make is to this server
POLICY = ("default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; "
          "img-src data:; base-uri 'none'; form-action 'none'")

# {{...}} markers rather than str.format: the style and script are full of braces
PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{title}} - budgetlora</title>
<style>
  body { font: 15px/1.45 system-ui, sans-serif; max-width: 46rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
  h1 { font-size: 1.3rem; margin: 0; word-break: break-all; }
  .meta { color: #666; margin: .2rem 0 1.2rem; }
  textarea { width: 100%; box-sizing: border-box; min-height: 7rem; font: inherit; padding: .5rem; }
  button { margin: .5rem 0 1rem; padding: .45rem 1.2rem; font: inherit; cursor: pointer; }
  #predicted { font-size: 1.25rem; font-weight: 600; min-height: 1.8rem; }
  #error { color: #b00020; white-space: pre-wrap; }
  .row { display: grid; grid-template-columns: 9rem 1fr 4.5rem; gap: .6rem; align-items: center; margin: .3rem 0; }
  .name { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
  .track { background: #eee; border-radius: 3px; height: 1.1rem; }
  .bar { background: #8aa4c8; height: 100%; border-radius: 3px; width: 0; transition: width .2s; }
  .row.top .bar { background: #2b6cb0; }
  .row.top .name { font-weight: 600; }
  select { font: inherit; margin: 0 0 .8rem; max-width: 100%; }
  .p { text-align: right; font-variant-numeric: tabular-nums; }
</style>
</head>
<body data-models="{{models}}">
<h1 id="run">{{title}}</h1>
<p class="meta" id="meta">{{meta}}</p>
<select id="model" aria-label="model" hidden></select>
<textarea id="text" placeholder="Paste a text to classify" autofocus></textarea>
<br><button id="classify" type="button">Classify</button>
<div id="result" data-state="idle">
  <div id="predicted"></div>
  <div id="error"></div>
  <div id="bars"></div>
</div>
<script>
"use strict";
const models = JSON.parse(document.body.dataset.models);
const $ = (id) => document.getElementById(id);
let model = models[0], bars = [];

function pick(m) {  // show a model's name and one empty bar per class
  model = m; $("run").textContent = m.title; $("meta").textContent = m.meta;
  $("bars").replaceChildren(); $("predicted").textContent = ""; $("error").textContent = "";
  $("result").dataset.state = "idle";
  bars = m.classes.map((name) => {
    const row = document.createElement("div"), label = document.createElement("span");
    const track = document.createElement("div"), bar = document.createElement("div"), p = document.createElement("span");
    row.className = "row"; label.className = "name"; track.className = "track"; bar.className = "bar"; p.className = "p";
    label.textContent = name; label.title = name; p.textContent = "";
    track.appendChild(bar); row.append(label, track, p); $("bars").appendChild(row);
    return { row, bar, p };
  });
}

models.forEach((m, i) => {
  const option = document.createElement("option");
  option.value = String(i); option.textContent = m.title === m.model ? m.title : m.title + " (" + m.model + ")";
  $("model").appendChild(option);
});
$("model").hidden = models.length < 2;
$("model").addEventListener("change", () => pick(models[Number($("model").value)]));

function show(probs, chosen) {
  probs.forEach((x, i) => {
    bars[i].bar.style.width = (100 * x).toFixed(1) + "%";
    bars[i].p.textContent = (100 * x).toFixed(1) + "%";
    bars[i].row.classList.toggle("top", chosen.includes(i));
  });
}

async function classify() {
  const text = $("text").value;
  if (!text.trim()) return;
  const result = $("result");
  result.dataset.state = "busy"; $("error").textContent = ""; $("classify").disabled = true;
  $("model").disabled = true;  // the answer is shown against the model it was asked of
  try {
    // relative, so the page also works behind a proxy that serves it under a path prefix
    const r = await fetch("predict", { method: "POST", headers: { "content-type": "application/json" },
                                       body: JSON.stringify({ texts: [text], model: model.model || undefined }) });
    const body = await r.json().catch(() => ({}));
    if (!r.ok) throw new Error(body.error || ("HTTP " + r.status));
    // a multi-label run answers a set, which may be empty: every label below its threshold
    const sets = body.label_sets;
    $("predicted").textContent = sets ? (body.class_sets[0].join(", ") || "(no label)") : body.classes[0];
    show(body.probabilities[0], sets ? sets[0] : [body.labels[0]]);
    result.dataset.state = "done";
  } catch (e) {
    $("predicted").textContent = "";
    $("error").textContent = String(e.message || e);
    result.dataset.state = "error";
  } finally {
    $("classify").disabled = false; $("model").disabled = false;
  }
}

$("classify").addEventListener("click", classify);
$("text").addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) classify(); });
const query = new URLSearchParams(location.search);
const asked = models.findIndex((m) => m.model === query.get("model") || m.aliases.includes(query.get("model")));
$("model").value = String(Math.max(asked, 0));
pick(models[Math.max(asked, 0)]);
const given = query.get("text");
// as the box's content, not only its value, so that the page as saved shows what was classified
if (given) { $("text").textContent = given; classify(); }
</script>
</body>
</html>
"""


def budget_line(info: dict) -> str:
    """'12,345 trainable parameters (budget 50,000)', from what /info reports; either number may be missing."""
    trainable, budget = info.get("trainable_params"), (info.get("metrics") or {}).get("budget")
    line = f"{_count(trainable)} trainable parameters" if trainable is not None else "trainable parameters not recorded"
    return line + (f" (budget {_count(budget)})" if budget is not None else "")


def _count(x) -> str:
    return f"{x:,}" if isinstance(x, int) and not isinstance(x, bool) else str(x)


def heading(info: dict) -> tuple[str, str]:
    """A run's title (its name, else its id) and the line under it, from its /info entry."""
    run_id = info.get("run_id") or info.get("run") or ""
    title = info.get("name") or run_id or "budgetlora"
    meta = [f"run {run_id}" if run_id and run_id != title else "", (info.get("base_model") or {}).get("name") or "",
            budget_line(info)]
    return str(title), " \u00b7 ".join(str(x) for x in meta if x)


def render(info: dict) -> str:
    """The page for the served runs, from /info (`serve.create_app`): the first run shown, the others offered in
    a list. Every value from a run is HTML-escaped."""
    models = []
    for m in info.get("models") or [info]:
        title, meta = heading(m)
        models.append({"model": str(m.get("model") or m.get("run_id") or ""), "aliases": [str(a) for a in
                       m.get("aliases", [])], "title": title, "meta": meta,
                       "classes": [str(x) for x in m.get("class_names", [])]})
    values = {"title": models[0]["title"], "meta": models[0]["meta"], "models": json.dumps(models)}
    # one pass, so a marker inside a run's own name is left as it is
    return re.sub(r"\{\{(\w+)\}\}", lambda m: escape(values[m.group(1)], quote=True), PAGE)
