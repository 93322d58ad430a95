"""The runs one server holds (`serve RUN [RUN ...]`): each under its run id, and under its name and folder where no
other run claims them; the first answers requests that name none. Runs that are adapters of one peft model (the
same base, `classifier.load_many`) form a group: a pass over requests to several of them is one forward pass where
peft can mix their adapters in a batch (`classifier.mixing_refused` says when not), else one pass per run.

Imports no torch itself: an ONNX server holds exports, each a group of its own."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from budgetlora import runs
from budgetlora.errors import ConfigError

PROBE = ["Stocks fell sharply as oil prices climbed to a record high on supply worries.",
         "The home team won the championship in extra time after a late equaliser.",
         "A new chip doubles battery life in laptops, the company said on Tuesday.",
         "Leaders met in Geneva to discuss the ceasefire and humanitarian corridors.",
         "Quarterly profit beat forecasts."]


@dataclass(eq=False)
class Group:
    """Served runs that share one model object; `mixed`: their texts share forward passes."""

    members: list = field(default_factory=list)
    mixed: bool = False
    why_not: str = ""  # for a group of several runs that is not mixed: why (shown in /info)


@dataclass(eq=False)
class ServedRun:
    name: str  # the run id (an int8 export's ends in -int8): what /info lists and a request names
    aliases: tuple[str, ...]  # other names a request may use: the run's name, its folder's name
    classifier: object  # a `Classifier`, or an `OnnxClassifier` under the ONNX backend
    group: Group
    # a multi-label run's per-label thresholds (read once: a run without them is refused here), else None
    thresholds: list[float] | None = None


class ServedRuns:
    """The served runs by name, and the forward pass for a micro-batch of (run, texts) requests."""

    def __init__(self, classifiers: list, mix: bool = True):
        if not classifiers:
            raise ConfigError("nothing to serve: no runs given")
        groups: dict[int, Group] = {}
        self.runs: list[ServedRun] = []
        for c in classifiers:
            group = groups.setdefault(id(_model_of(c)), Group())
            run = ServedRun(_run_id(c), (), c, group, getattr(c, "thresholds", None))
            group.members.append(run)
            self.runs.append(run)
        seen = {}
        for r in self.runs:
            if r.name in seen:
                raise ConfigError(f"{seen[r.name].classifier.path} and {r.classifier.path} are the same run "
                                  f"({r.name}); serve it once")
            seen[r.name] = r
        self._name_runs()
        for group in groups.values():
            if len(group.members) > 1:
                from budgetlora.inference.classifier import mixing_refused

                group.why_not = mixing_refused([m.classifier for m in group.members], PROBE) if mix else \
                    "mixed batches switched off"
                group.mixed = not group.why_not
        self.groups = list(groups.values())

    def _name_runs(self) -> None:
        """Aliases: a run's name and folder name, kept only where they point at one run and are no run's id."""
        ids = {r.name for r in self.runs}
        wanted = {r.name: [a for a in dict.fromkeys((_config_name(r.classifier), Path(r.classifier.path).name))
                           if a and a != r.name] for r in self.runs}
        claims: dict[str, int] = {}
        for names in wanted.values():
            for a in names:
                claims[a] = claims.get(a, 0) + 1
        for r in self.runs:
            r.aliases = tuple(a for a in wanted[r.name] if claims[a] == 1 and a not in ids)
        self._by_name = {n: r for r in self.runs for n in (r.name, *r.aliases)}

    @property
    def default(self) -> ServedRun:
        return self.runs[0]

    def find(self, name: str | None) -> ServedRun | None:
        """The run a request names; the first run when it names none; None for a name no run has."""
        return self.default if name is None else self._by_name.get(name)

    def logits(self, requests: list[tuple[ServedRun, list[str]]]) -> list[np.ndarray]:
        """Each request's logits: per group, the texts of all its requests in one forward pass where the group
        is mixed, else one pass per run (the texts of a run's requests together)."""
        out: list[np.ndarray | None] = [None] * len(requests)
        by_group: dict[int, dict[int, list[int]]] = {}  # group -> run -> request indices, in arrival order
        for i, (run, _) in enumerate(requests):
            by_group.setdefault(id(run.group), {}).setdefault(id(run), []).append(i)
        for per_run in by_group.values():
            asked = [(requests[idx[0]][0], [t for i in idx for t in requests[i][1]]) for idx in per_run.values()]
            if len(asked) > 1 and asked[0][0].group.mixed:
                from budgetlora.inference.classifier import mixed_logits

                rows = mixed_logits([(r.classifier, texts) for r, texts in asked])
            else:
                rows = [r.classifier.logits(texts) for r, texts in asked]
            for idx, got in zip(per_run.values(), rows):
                start = 0
                for i in idx:
                    n = len(requests[i][1])
                    out[i], start = got[start:start + n], start + n
        return out

    def batching(self) -> list[dict]:
        """/info's account of how each group's requests share passes."""
        return [{"models": [m.name for m in g.members], "mixed": g.mixed, **({"why_not": g.why_not} if g.why_not
                                                                            else {})}
                for g in self.groups if len(g.members) > 1]


def run_folders(paths: list[str | Path]) -> list[Path]:
    """The run folders `serve` was given: a run folder as it is, a folder of runs as every finished run inside it
    (in name order); the same folder given twice is served once, and two folders of one run id are refused here,
    before anything loads."""
    out: dict[Path, Path] = {}
    for p in map(Path, paths):
        if not p.is_dir():
            raise FileNotFoundError(f"run folder not found: {p}")
        found = [p] if (p / runs.CONFIG).is_file() else runs.list_runs(p)
        if not found:
            raise FileNotFoundError(f"{p} is neither a run folder (no {runs.CONFIG}) nor a folder of finished runs")
        for f in found:
            out.setdefault(f.resolve(), f)
    seen: dict[str, Path] = {}
    for f in out.values():
        run_id = runs.load_config(f).run_id
        if run_id in seen:
            raise ConfigError(f"{seen[run_id]} and {f} are the same run ({run_id}); serve it once")
        seen[run_id] = f
    return list(out.values())


def _model_of(classifier) -> object:
    run = getattr(classifier, "run", None)  # a torch Classifier; an ONNX export holds its own session
    return getattr(run, "model", classifier)


def _run_id(classifier) -> str:
    run = getattr(classifier, "run", None)
    if run is not None:
        return str(run.metrics.get("run_id") or run.cfg.run_id)
    name = str(classifier.export.get("run_id") or Path(classifier.path).name)
    kind = (classifier.export.get("quantization") or {}).get("type")
    return f"{name}-{kind}" if kind else name  # an int8 export beside its run's fp32 one is another model


def _config_name(classifier) -> str:
    run = getattr(classifier, "run", None)
    return str(run.cfg.name if run is not None else classifier.export.get("name", "") or "")
