"""Budget-aware hyper-parameter sweeps on Optuna: grids or TPE searches over any config field, resumable, shared
between processes and machines through one study database.

Spec format (YAML)::

    base: ../roberta-m3.yaml        # a config path (relative to this file, else to the working directory), a
                                    # shipped preset by name (minilm-quick), or an inline config mapping
                                    # ({model: {name: minilm}, lora: {r: 4}, ...})
    set:                            # optional dotted overrides applied to the base before every trial
      data.train_limit: 2000
    grid:                           # exhaustive: dotted field -> list of values (Optuna's GridSampler)
      lora.r: [4, 8, 16]
      lora.targets: ["q,v", "q,k,v,o"]   # list-valued fields take comma strings
    variants:                       # optional: named sets of overrides, swept as one more key `variant`
      vera: {method: vera}          # (crossed with the grid, or one more choice of the search)
      dora: {lora.dora: true}
    # or
    search:                         # sampled by TPE: dotted field -> a range or a set of choices
      train.lr: {low: 1.0e-5, high: 1.0e-3, log: true}
      lora.r: {low: 2, high: 16}    # integer bounds sample integers (optional step)
      lora.targets: {choices: ["q,v", "q,k,v"]}
    n_trials: 20                    # search: how many trials in total; grid: optional cap (default: the grid)
    objective: val_accuracy         # a key of the run's metrics.json; maximised (minimised if it names a loss)
    fill: false                     # true: the method's size (lora.r, adalora.init_r, vera.r, loha.r, lokr.r)
                                    # becomes the largest that fits the budget (`max_rank:`, its old name, works)
    runs: sweeps/<stem>/runs        # where run folders go (default shown); relative to the working directory
    seed: 0                         # sampler seed
    seeds: 1                        # train every config this many times (train.seed, +1, ...); the objective is
                                    # their mean, and the report shows each config's mean with its interval
    prune: median                   # stop a trial whose periodic validation accuracy is below the median of
                                    # earlier trials at the same step (Optuna's MedianPruner); none = off. The
                                    # default is median for a search, none for a grid (every point is wanted)
    heartbeat_s: 10                 # a worker records a heartbeat this often while a trial runs, and a RUNNING
    grace_s: 60                     # trial silent for grace_s belongs to a dead worker: failed, then retried
    time_budget: 30m                # optional (90s, 30m, 1.5h): start no trial the time left cannot hold

Every trial plans its config first: one over the budget is pruned (its planned total kept as the user attribute
`trainable_params`) before any weight loads. Trials map to run ids, so a config that already finished, in this
sweep or any other using the same runs folder, reuses its metrics.json instead of training again, and an
interrupted sweep resumes by rerunning the same command (the study is stored in `sweeps/<stem>/study.db`, or
any SQLAlchemy URL given with `--storage`, so several machines can share one study). A trial that raises is
recorded FAIL with its error as the user attribute `error`, and the sweep goes on; grid points that failed are
retried once when the sweep is rerun.

A trial stopped by the pruner is recorded PRUNED with the step it stopped at (user attribute `pruned_at_step`);
its run folder keeps its checkpoint, and a rerun of the sweep counts the trial as done rather than training it.

A worker killed mid-trial (SIGKILL, a lost machine) leaves its trial RUNNING with a heartbeat that stops. Any
worker of the study that is still alive fails it once the heartbeat is `grace_s` old and queues it again (up to
two retries); a worker with nothing left to draw waits for the RUNNING trials of others instead of leaving, so the
retry is taken and the sweep completes.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path
from typing import Any, Callable

import yaml

from budgetlora.config import Config, ConfigError, preset_path
from budgetlora.experiments.timebudget import parse_duration

DEFAULT_ROOT = "sweeps"
HEARTBEAT_S = 10  # a worker writes a heartbeat this often while a trial runs ...
GRACE_S = 60  # ... and a RUNNING trial silent for this long belongs to a dead worker: failed, then retried
VARIANT = "variant"  # the swept key that picks one of the spec's named `variants:`
SPEC_KEYS = {"base", "set", "grid", "search", "n_trials", "objective", "max_rank", "fill", "variants", "runs", "seed",
             "seeds", "prune", "name", "heartbeat_s", "grace_s", "time_budget"}
PRUNERS = ("median", "none")

Runner = Callable[..., Path]  # (config, runs folder[, on_record=callback]) -> the finished run folder


@dataclasses.dataclass(frozen=True)
class Spec:
    name: str  # the study name, by default the spec file's stem
    base: Config
    grid: dict[str, list]
    search: dict[str, dict]
    n_trials: int | None
    objective: str
    fill: bool  # solve the method's size for the budget (plan --fill)
    runs: Path
    folder: Path  # sweeps/<name>: study.db, report, tracking logs
    seed: int = 0
    heartbeat_s: int = HEARTBEAT_S
    grace_s: int = GRACE_S
    variants: dict[str, dict] = dataclasses.field(default_factory=dict)  # name -> dotted overrides
    seeds: int = 1  # runs per config: train.seed, train.seed + 1, ...
    prune: str = "none"  # median: Optuna's MedianPruner on the periodic validation accuracy
    time_budget: float | None = None  # seconds one invocation may start trials in (--time-budget overrides it)

    @property
    def direction(self) -> str:
        return "minimize" if "loss" in self.objective else "maximize"

    def points(self) -> list[dict[str, Any]]:
        """Every grid point as a {field: value} mapping (empty for a search)."""
        keys = sorted(self.grid)
        return [dict(zip(keys, values)) for values in itertools.product(*(self.grid[k] for k in keys))]

    def config(self, params: dict[str, Any], name: str = "") -> Config:
        """The base with one point's values (a `variant` stands for its overrides; a swept field of the same
        name wins over the variant's)."""
        overrides = dict(params)
        if VARIANT in overrides:
            overrides = {**self.variants[overrides.pop(VARIANT)], **overrides}
        return self.base.replace(**overrides, name=name or self.base.name)

    def fingerprint(self) -> str:
        """What makes two specs the same study: the space and the base, not the trial count."""
        return json.dumps({"base": self.base.run_id, "grid": self.grid, "search": self.search,
                           "max_rank": self.fill, "objective": self.objective,  # key kept: older studies resume
                           **({"variants": self.variants} if self.variants else {}),
                           **({"seeds": self.seeds} if self.seeds != 1 else {})}, sort_keys=True)

    def seed_configs(self, cfg: Config) -> list[Config]:
        """The config once per seed: the first is `cfg` itself, so one seed is exactly a plain sweep."""
        return [cfg] + [cfg.replace(**{"train.seed": cfg.train.seed + i}) for i in range(1, self.seeds)]


def _resolve(ref: str, spec_dir: Path) -> Path:
    for candidate in (spec_dir / ref, Path(ref), preset_path(ref)):
        if candidate is not None and candidate.is_file():
            return candidate
    raise ConfigError(f"base preset not found: {ref} (looked beside the spec, in the working directory and "
                      "among the shipped presets)")


def load_spec(path: str | Path, root: str | Path = DEFAULT_ROOT) -> Spec:
    """Read and check a sweep spec: every grid value and search range must make a valid config."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sweep spec not found: {path}")
    try:
        d = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    if not isinstance(d, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    unknown = set(d) - SPEC_KEYS
    if unknown:
        raise ConfigError(f"{path}: unknown sweep key(s): {', '.join(sorted(unknown))}")
    base = d.get("base", {})
    cfg = Config.from_yaml(_resolve(base, path.parent)) if isinstance(base, str) else Config.from_dict(base)
    if d.get("set"):
        cfg = cfg.replace(**d["set"])
    grid, search = d.get("grid") or {}, d.get("search") or {}
    variants = _variants(d.get("variants"), cfg, path)
    if variants:  # one more swept key whose values each set several fields (e.g. a method and its options)
        if search:
            search = {**search, VARIANT: {"choices": list(variants)}}
        else:
            grid = {**grid, VARIANT: list(variants)}
    if bool(grid) == bool(search):
        raise ConfigError(f"{path}: give exactly one of `grid:` or `search:`")
    for key, values in grid.items():
        if key == VARIANT:
            continue
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{path}: grid.{key} must be a non-empty list")
        for v in values:
            if not (v is None or isinstance(v, (str, int, float, bool))):
                raise ConfigError(f"{path}: grid.{key}: {v!r} is not a scalar (write lists as 'a,b' strings)")
            cfg.replace(**{key: v})  # unknown field or bad value: fail now, not in trial 17
    for key, rng in search.items():
        if key == VARIANT:
            continue
        if not isinstance(rng, dict) or not ({"choices"} <= set(rng) or {"low", "high"} <= set(rng)):
            raise ConfigError(f"{path}: search.{key} must be {{low, high[, log, step]}} or {{choices: [...]}}")
        for v in rng.get("choices", [rng.get("low"), rng.get("high")]):
            cfg.replace(**{key: v})
    n_trials = d.get("n_trials")
    if search and not n_trials:
        raise ConfigError(f"{path}: a search needs n_trials")
    heartbeat, grace = d.get("heartbeat_s", HEARTBEAT_S), d.get("grace_s", GRACE_S)
    if not (isinstance(heartbeat, int) and isinstance(grace, int) and 1 <= heartbeat < grace):
        raise ConfigError(f"{path}: heartbeat_s and grace_s must be whole seconds with 1 <= heartbeat_s < grace_s "
                          f"(got {heartbeat!r}, {grace!r})")
    seeds, prune = d.get("seeds", 1), str(d.get("prune", "median" if search else "none"))
    if not (isinstance(seeds, int) and not isinstance(seeds, bool) and 1 <= seeds <= 100):
        raise ConfigError(f"{path}: seeds must be a whole number from 1 to 100, got {seeds!r}")
    if prune not in PRUNERS:
        raise ConfigError(f"{path}: prune must be one of {', '.join(PRUNERS)}, got {prune!r}")
    name = str(d.get("name") or path.stem)
    folder = Path(root) / name
    return Spec(name=name, base=cfg, grid=grid, search=search, n_trials=int(n_trials) if n_trials else None,
                objective=str(d.get("objective", "val_accuracy")),
                fill=bool(d.get("fill", d.get("max_rank", False))),
                runs=Path(d["runs"]) if d.get("runs") else folder / "runs", folder=folder, seed=int(d.get("seed", 0)),
                heartbeat_s=heartbeat, grace_s=grace, variants=variants, seeds=seeds, prune=prune,
                time_budget=parse_duration(d.get("time_budget"), f"{path}: time_budget"))


def _variants(raw, cfg: Config, path: Path) -> dict[str, dict]:
    """`variants: {name: {dotted.field: value, ...}}`, each checked against the base now, not in trial 17."""
    if not raw:
        return {}
    if not isinstance(raw, dict) or not all(isinstance(v, dict) for v in raw.values()):
        raise ConfigError(f"{path}: variants must map each name to a mapping of dotted overrides")
    for name, overrides in raw.items():
        try:
            cfg.replace(**overrides)
        except ConfigError as e:
            raise ConfigError(f"{path}: variant {name!r}: {e}") from None
    return {str(k): dict(v) for k, v in raw.items()}


# -- storage ---------------------------------------------------------------------------------------------------


def param_key(params: dict) -> str:
    return json.dumps(params, sort_keys=True)


def _label(spec: Spec, params: dict) -> str:
    short = ",".join(f"{k.split('.')[-1]}={v}" for k, v in sorted(params.items()))
    return f"{spec.name}:{short}" if short else spec.name


def trial_config(spec: Spec, trial) -> Config:
    """Ask the trial for every swept field and build the config (the size solved last when `fill` is set)."""
    params = {}
    for key, values in spec.grid.items():
        params[key] = trial.suggest_categorical(key, values)
    for key, rng in spec.search.items():
        if "choices" in rng:
            params[key] = trial.suggest_categorical(key, rng["choices"])
        elif isinstance(rng["low"], int) and isinstance(rng["high"], int):
            params[key] = trial.suggest_int(key, rng["low"], rng["high"], step=rng.get("step", 1),
                                            log=bool(rng.get("log", False)))
        else:
            params[key] = trial.suggest_float(key, float(rng["low"]), float(rng["high"]), step=rng.get("step"),
                                              log=bool(rng.get("log", False)))
    return spec.config(params, name=_label(spec, params))
