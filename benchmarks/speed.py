"""Wall-clock race on the same data, encoder and machine, each contender in its own process (one after the other,
so neither inherits the other's threads, caches or accelerator state):

(a) the reference recipe: HF Trainer + peft LoRA (r=10, alpha=32, query/value, head in modules_to_save), dynamic
    padding with truncation at 512, random batches of 32, lr 2e-4, warmup 0.1, weight decay 0.01, linear decay,
    evaluation once per epoch;
(b) budgetlora's fast path, `budgetlora.training.train.train(cfg)`: the main job's preset (--config), with the race's data
    sizes and any --set overrides.

Printed for each: training samples/s (evaluation time excluded), evaluation samples/s (on the test split), time to
reach the reference's final validation accuracy, final validation / test accuracy and peak resident memory; the
ratios come last.

Timing (a) at a finer grain than once per epoch without distorting it: (a) is also evaluated every
--ref-eval-steps steps, and the run time of every such extra evaluation is subtracted from the wall clock of the
later points, so the reported times are those of the once-per-epoch recipe. Evaluation runs without gradients,
in eval mode and from a sequential sampler, so it changes neither the weights nor the random batch order.
(b) is validated at the same grain (train.eval_every = --ref-eval-steps unless --set says otherwise) and its times
come from its history.csv's train_s, the clock less its own validation, so both sides are timed alike.

Each repeat runs both contenders with the seed --seed + repeat; the ratios are printed per repeat, then their
median and range.

    python benchmarks/speed.py                                   # 4,000 train / 1,000 val / 1,000 test, 3 repeats
    python benchmarks/speed.py --repeats 1 --train-limit 2000 --test-limit 500
    python benchmarks/speed.py --model DIR --set data.train=train.csv.gz data.test=test.csv.gz   # a model folder
    python benchmarks/speed.py --model mpnet --config mpnet-cpu --repeats 1 --train-limit 800   # the 12 x 768 shape
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from budgetlora.config import Config  # noqa: E402
from budgetlora.data.readers import load_data  # noqa: E402
from budgetlora.hardware import PeakMemory  # noqa: E402


# -- memory: the product's own sampler, so each contender gets its own peak inside one process ----------------------
class PeakRSS(PeakMemory):
    """hardware.PeakMemory, carried between processes as bytes."""

    def as_dict(self) -> dict:
        return {"peak": self.peak, "start": self.start}

    @classmethod
    def from_dict(cls, d: dict) -> "PeakRSS":
        m = cls()
        m.peak, m.start = d["peak"], d["start"]
        return m


def first_reaching(points: list[tuple[float, float]], target: float) -> float | None:
    """Earliest time of an evaluation whose accuracy is at least the target (no interpolation)."""
    for t, a in points:
        if a >= target - 1e-9:
            return t
    return None


# -- (a) the reference recipe --------------------------------------------------------------------------------------
def run_reference(data, args) -> dict:
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )
    from transformers.utils import logging as hf_logging

    from budgetlora.adapters.architectures import resolve_name, short_name_map

    hf_logging.set_verbosity_error()
    path = resolve_name(args.model)
    tok = AutoTokenizer.from_pretrained(path)

    def ds(split):  # a list of feature dicts is a map-style dataset to Trainer: no `datasets` package needed
        enc = tok(split.texts, truncation=True, max_length=512)
        return [{"input_ids": i, "attention_mask": m, "label": int(y)}
                for i, m, y in zip(enc["input_ids"], enc["attention_mask"], split.labels)]

    train_ds, val_ds, test_ds = ds(data["train"]), ds(data["val"]), ds(data["test"])
    torch.manual_seed(args.seed)
    base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
    short = short_name_map(base.config.model_type)  # BERT/RoBERTa: attention.self.query; MPNet: attention.attn.q
    model = get_peft_model(base, LoraConfig(task_type=TaskType.SEQ_CLS, r=10, lora_alpha=32, lora_dropout=0.1,
                                            target_modules=[short["q"][0], short["v"][0]],
                                            modules_to_save=["classifier"]))
    steps_per_epoch = math.ceil(len(train_ds) / 32)
    total_steps = steps_per_epoch * args.epochs

    class Clock(TrainerCallback):
        """Wall time at each evaluation; extra (finer-than-per-epoch) evaluations are taken off the clock."""

        def __init__(self):
            self.t0, self.extra, self.eval_total, self.points, self.evaluated_steps = 0.0, 0.0, 0.0, [], set()

        def on_train_begin(self, a, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_epoch_end(self, a, state, control, **kw):
            if state.global_step not in self.evaluated_steps:  # the recipe's own once-per-epoch evaluation
                control.should_evaluate = True
            return control

        def on_evaluate(self, a, state, control, metrics=None, **kw):
            if "eval_accuracy" not in (metrics or {}) or self.t0 == 0.0:
                return
            step, runtime = state.global_step, metrics["eval_runtime"]
            recipe = (step % steps_per_epoch == 0 or step == total_steps) and step not in self.evaluated_steps
            self.evaluated_steps.add(step)
            self.eval_total += runtime
            if not recipe:
                self.extra += runtime
            self.points.append((step, time.perf_counter() - self.t0 - self.extra, metrics["eval_accuracy"], recipe))

    clock = Clock()
    targs = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="ref-"), per_device_train_batch_size=32,
        per_device_eval_batch_size=args.ref_eval_batch, learning_rate=2e-4, warmup_steps=0.1, weight_decay=0.01,
        lr_scheduler_type="linear", num_train_epochs=args.epochs,
        eval_strategy="steps" if args.ref_eval_steps else "epoch", eval_steps=args.ref_eval_steps or None, save_strategy="no", logging_strategy="no", report_to="none",
        seed=args.seed, data_seed=args.seed, use_cpu=not torch.cuda.is_available(), disable_tqdm=True,
        dataloader_num_workers=0)

    def accuracy(p):
        return {"accuracy": float((np.asarray(p.predictions).argmax(-1) == p.label_ids).mean())}

    trainer = Trainer(model=model, args=targs, train_dataset=train_ds, eval_dataset=val_ds,
                      data_collator=DataCollatorWithPadding(tok), compute_metrics=accuracy, callbacks=[clock])
    t = time.perf_counter()
    out = trainer.train()
    train_wall = time.perf_counter() - t
    recipe_evals = [p for p in clock.points if p[3]]
    pred = trainer.predict(test_ds)
    return {
        "train_s": train_wall - clock.extra,  # the once-per-epoch recipe's wall time
        "train_sps": len(train_ds) * args.epochs / (train_wall - clock.eval_total),
        "eval_sps": len(test_ds) / pred.metrics["test_runtime"],
        "final_val": recipe_evals[-1][2],
        "test_acc": float((pred.predictions.argmax(-1) == pred.label_ids).mean()),
        "points": [(p[1], p[2]) for p in clock.points],
        "steps": out.global_step,
    }


# -- (b) budgetlora -----------------------------------------------------------------------------------------------
def run_budgetlora(data, args, cfg: Config) -> dict:
    import budgetlora.training.train as bt
    from budgetlora.inference.load import load_run
    from budgetlora.runs import read_json
    from budgetlora.training.evaluate import predict_logits

    spent = {"s": 0.0}
    inner = bt.logits_for_ids

    def timed(*a, **k):  # validation time, so that training throughput can exclude it
        t = time.perf_counter()
        try:
            return inner(*a, **k)
        finally:
            spent["s"] += time.perf_counter() - t

    bt.logits_for_ids = timed
    try:
        run = bt.train(cfg, root=tempfile.mkdtemp(prefix="bl-"), data=data, force=True)
    finally:
        bt.logits_for_ids = inner
    m = read_json(run / "metrics.json")
    with open(run / "history.csv") as f:
        hist = [r for r in csv.DictReader(f) if r["val_accuracy"]]
    points = [(float(r["train_s"]), float(r["val_accuracy"])) for r in hist]  # validation off the clock
    loaded = load_run(run, verify=False)
    t = time.perf_counter()
    logits = predict_logits(loaded.model, loaded.tokenizer, data["test"].texts, cfg.model.max_length,
                            cfg.train.eval_batch_size)
    eval_s = time.perf_counter() - t
    n, bs = len(data["train"]), cfg.train.batch_size
    spe = math.ceil(n / bs)  # the last batch of an epoch is the short one
    samples = sum(bs if s % spe < spe - 1 else n - (spe - 1) * bs for s in range(m["steps"]))
    return {
        "train_s": m["train_time_s"],
        "train_sps": samples / (m["train_time_s"] - spent["s"]),
        "eval_sps": len(data["test"]) / eval_s,
        "final_val": m["val_accuracy"],
        "test_acc": m["test_accuracy"],
        "test_acc_check": float((logits.argmax(1) == data["test"].labels).mean()),
        "points": points,
        "steps": m["steps"],
        "best_step": m["best_step"],
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm")
    p.add_argument("--config", default="minilm-default", help="budgetlora's settings: the main job's preset (its "
                   "data sizes replaced by the race's)")
    p.add_argument("--train-limit", type=int, default=5000, help="rows drawn from train, validation included")
    p.add_argument("--test-limit", type=int, default=1000)
    p.add_argument("--val-fraction", type=float, default=0.2, help="validation share held out of the train rows")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--repeats", type=int, default=3, help="repeats of the whole race, seeds --seed, --seed + 1, ...")
    p.add_argument("--epochs", type=int, default=1, help="reference epochs")
    p.add_argument("--ref-eval-steps", type=int, default=10, help="validation every N steps on both sides, taken "
                   "off the clock (the reference's once-per-epoch evaluation stays on it)")
    p.add_argument("--ref-eval-batch", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch default)")
    p.add_argument("--only", choices=["both", "ref", "budgetlora"], default="both",
                   help="both: each contender in a child process of its own, then the comparison")
    p.add_argument("--result-json", default=None, help=argparse.SUPPRESS)  # where a child process leaves its result
    p.add_argument("--target", type=float, default=None, help="target accuracy when the reference is not run")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="budgetlora config overrides, e.g. train.lr=2e-3 train.eval_every=5")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.only == "both" and args.result_json is None and args.repeats > 1:
        return repeat_races(args, argv if argv is not None else sys.argv[1:])
    cfg = Config.from_yaml(args.config).replace(**{"model.name": args.model, "data.train_limit": args.train_limit,
                              "data.test_limit": args.test_limit, "data.val_fraction": args.val_fraction,
                              "train.seed": args.seed, "train.eval_every": args.ref_eval_steps})
    cfg = cfg.replace(**dict(kv.split("=", 1) for kv in args.set))
    data = load_data(cfg) if args.only != "both" else None
    if data is None:
        print(f"model {args.model}; each contender in its own process", flush=True)
    else:
        print(f"model {args.model}; train {len(data['train'])} / val {len(data['val'])} / test {len(data['test'])} "
              f"rows; torch threads {torch.get_num_threads()}; attention {attn_impl(cfg)}", flush=True)
    tc, mc = cfg.train, cfg.model
    print(f"budgetlora settings: lr {tc.lr}, schedule {tc.schedule}, warmup {tc.warmup}, batch {tc.batch_size}, "
          f"epochs {tc.epochs}, eval_every {tc.eval_every}, max_length {mc.max_length}, r {cfg.lora.r}, "
          f"alpha {cfg.lora.alpha}, targets {','.join(cfg.lora.targets)}, dropout {cfg.lora.dropout}", flush=True)

    res, mem = {}, {}
    if args.only == "both":  # one child process per contender, one after the other
        for key, only in (("ref", "ref"), ("bl", "budgetlora")):
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp) / "result.json"
                subprocess.run([sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]),
                                "--only", only, "--result-json", str(out)], check=True)
                got = json.loads(out.read_text())
            res[key], mem[key] = got["result"], PeakRSS.from_dict(got["memory"])
            print(f"{'(a) reference' if key == 'ref' else '(b) budgetlora'} done: {res[key]['train_s']:.1f}s",
                  flush=True)
    else:
        key = "ref" if args.only == "ref" else "bl"
        with PeakRSS() as m:
            res[key] = run_reference(data, args) if key == "ref" else run_budgetlora(data, args, cfg)
        mem[key] = m
        if args.result_json:
            Path(args.result_json).write_text(json.dumps({"result": res[key], "memory": m.as_dict()}))
            return

    target = res["ref"]["final_val"] if "ref" in res else args.target
    rows = []
    for key, label in (("ref", "(a) reference (HF Trainer)"), ("bl", "(b) budgetlora")):
        if key not in res:
            continue
        r = res[key]
        r["t_target"] = first_reaching(r["points"], target) if target is not None else None
        rows.append((label, r, mem[key]))
    print()
    print(f"target = reference final val accuracy = {target}")
    hdr = (f"{'':28} {'train s/s':>9} {'eval s/s':>9} {'train s':>8} {'t->target':>9} {'final val':>9} "
           f"{'test acc':>8} {'peak RSS':>9} {'RSS rise':>9}")
    print(hdr)
    for label, r, m in rows:
        tt = f"{r['t_target']:.1f}" if r["t_target"] is not None else "never"
        print(f"{label:28} {r['train_sps']:9.1f} {r['eval_sps']:9.1f} {r['train_s']:8.1f} {tt:>9} "
              f"{r['final_val']:9.4f} {r['test_acc']:8.4f} {m.peak / 2**20:7.0f}MB {(m.peak - m.start) / 2**20:7.0f}MB")
    for label, r, _ in rows:
        print(f"{label} val curve (s, acc): " + ", ".join(f"({t:.1f}, {a:.3f})" for t, a in r["points"]))
    print(f"process max RSS (getrusage): {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}MB")
    if "ref" in res and "bl" in res:
        a, b = res["ref"], res["bl"]
        print()
        print("ratios (budgetlora / reference; time: reference / budgetlora)")
        print(f"  training samples/s   x{b['train_sps'] / a['train_sps']:.2f}")
        print(f"  evaluation samples/s x{b['eval_sps'] / a['eval_sps']:.2f}")
        if a["t_target"] and b["t_target"]:
            print(f"  time to target       x{a['t_target'] / b['t_target']:.2f} sooner "
                  f"({a['t_target']:.1f}s vs {b['t_target']:.1f}s)")
        else:
            print("  time to target       budgetlora never reached the target")
        print(f"  total train time     x{a['train_s'] / b['train_s']:.2f}")
        print(f"  final val accuracy   {b['final_val'] - a['final_val']:+.4f}; test accuracy "
              f"{b['test_acc'] - a['test_acc']:+.4f}")
        rise = {k: mem[k].peak - mem[k].start for k in mem}
        print(f"  peak RSS rise        x{rise['bl'] / max(1, rise['ref']):.2f}")
    sys.stdout.flush()


RATIO_LINES = ("training samples/s", "evaluation samples/s", "time to target", "total train time",
               "final val accuracy", "peak RSS rise")


def repeat_races(args, argv: list[str]) -> None:
    """The whole race once per seed, each in a child process; then every ratio's median and range."""
    got: dict[str, list[str]] = {k: [] for k in RATIO_LINES}
    times: list[float] = []
    rest = [a for i, a in enumerate(argv) if a != "--repeats" and (i == 0 or argv[i - 1] != "--repeats")]
    rest = [a for i, a in enumerate(rest) if a != "--seed" and (i == 0 or rest[i - 1] != "--seed")]
    for r in range(args.repeats):
        seed = args.seed + r
        print(f"\n=== repeat {r + 1}/{args.repeats}, seed {seed} ===", flush=True)
        out = subprocess.run([sys.executable, __file__, *rest, "--repeats", "1", "--seed", str(seed)],
                             check=True, capture_output=True, text=True).stdout
        print(out, flush=True)
        for line in out.splitlines():
            key = next((k for k in RATIO_LINES if line.strip().startswith(k)), None)
            if key:
                got[key].append(line.strip()[len(key):].strip())
            if line.strip().startswith("time to target") and "sooner" in line:
                times.append(float(line.split("x", 1)[1].split()[0]))
    print(f"\n=== {args.repeats} repeats ===")
    for key, vals in got.items():
        print(f"  {key:22} " + " | ".join(vals))
    if times:
        print(f"  time to target: median x{statistics.median(times):.2f} sooner, range x{min(times):.2f}-"
              f"x{max(times):.2f} over {len(times)} of {args.repeats} repeats that reached it")


def attn_impl(cfg: Config) -> str:
    from budgetlora.adapters.architectures import load_model_config, skeleton

    config = load_model_config(cfg.model.name, cfg.model.num_labels)
    impl = str(skeleton(config).config._attn_implementation)
    # transformers' own for the reference recipe; budgetlora runs MPNet's through SDPA (adapters/attention.py)
    return f"{impl} (budgetlora: sdpa)" if config.model_type == "mpnet" else impl


if __name__ == "__main__":
    main()
