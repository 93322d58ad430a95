"""The CPU levers, each measured as a ratio inside one process, contenders interleaved round by round so that a
shared machine's noise falls on both sides alike. Real AG News batches (length-grouped as the loop draws them),
the embedded MiniLM with LoRA r=8 on every linear layer plus the head (BASELINE below).

    python benchmarks/cpu_levers.py                      # every lever, ~6 minutes on 2 cores
    python benchmarks/cpu_levers.py --only precision threads --rounds 5

Levers: precision (fp32 vs bf16 autocast) x padding (each batch's longest row vs bucketed widths); threads (1 vs
all cores, idle and with one core kept busy by another process); evaluation (fp32 vs bf16, batch 64 vs 256,
length-sorted vs input order, with the labels' agreement); adapters only on the top layers (`lora.layers`);
torch.compile (its compile time against the steady step gain, extrapolated to a main-job-sized run).
"""
from __future__ import annotations

import argparse
import contextlib
import multiprocessing
import os
import statistics
import time

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from budgetlora.adapters.model import build, load_tokenizer  # noqa: E402
from budgetlora.config import Config  # noqa: E402
from budgetlora.data.readers import load_data  # noqa: E402
from budgetlora.data.tokens import Tokens, encode, length_grouped_batches
from budgetlora.hardware import cpu_has_native_bf16  # noqa: E402
from budgetlora.training.evaluate import logits_for_ids  # noqa: E402

# the adapter every lever is measured on, unless it is the lever: r=8 on every linear layer of all six layers, the
# checkpoint's dropout (the main job before it adopted the levers)
BASELINE = {"data.train_limit": 4000, "data.test_limit": 2000, "lora.r": 8, "lora.alpha": 16, "lora.layers": [],
            "lora.dropout": 0.1, "train.base_dropout": -1}


def setup(args, **overrides):
    cfg = Config.from_yaml("minilm-default").replace(**{**BASELINE, **overrides})
    model, _ = build(cfg)
    return cfg, model


def batches_for(cfg, tok, texts, n_batches: int, seed: int = 0):
    tokens = Tokens(encode(tok, texts, cfg.model.max_length), tok.pad_token_id)
    order = length_grouped_batches(tokens.lengths, cfg.train.batch_size, seed, 0)[:n_batches]
    return tokens, order


def make_step(model, dtype):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step(batch, targets):
        with torch.autocast("cpu", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            logits = model(**batch).logits
        loss = loss_fn(logits.float(), targets)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def time_steps(step, tokens, labels, order, padding, max_length) -> float:
    """Seconds per step over the given batches."""
    t = time.perf_counter()
    for rows in order:
        step(tokens.batch(rows, padding, max_length), labels[rows])
    return (time.perf_counter() - t) / len(order)


def interleaved(contenders: dict, rounds: int) -> dict[str, list[float]]:
    """Each contender once per round, in rotating order; returns every round's figure."""
    names, out = list(contenders), {k: [] for k in contenders}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            out[name].append(contenders[name]())
    return out


def summary(res: dict[str, list[float]], unit: str = "s/step") -> None:
    for name, xs in res.items():
        print(f"  {name:34} median {statistics.median(xs):.3f} {unit}  (min {min(xs):.3f}, max {max(xs):.3f}, "
              f"n {len(xs)})", flush=True)


def ratio(res, slow: str, fast: str) -> str:
    """Per-round ratios slow/fast (each round's pair was measured back to back): median and range."""
    rs = [a / b for a, b in zip(res[slow], res[fast])]
    return f"x{statistics.median(rs):.2f} (rounds {min(rs):.2f}-{max(rs):.2f})"


# -- the levers ------------------------------------------------------------------------------------------------------
def lever_precision(args, data, tok):
    cfg, model = setup(args)
    tokens, order = batches_for(cfg, tok, data["train"].texts, args.steps)
    labels = torch.as_tensor(data["train"].labels)
    model.train()
    steps = {"fp32": make_step(model, None), "bf16": make_step(model, torch.bfloat16)}
    contenders = {f"{p} {pad}": (lambda p=p, pad=pad: time_steps(steps[p], tokens, labels, order, pad, 128))
                  for p in steps for pad in ("longest", "buckets")}
    for c in contenders.values():  # warm-up: first-touch allocations and kernel selection
        c()
    res = interleaved(contenders, args.rounds)
    print(f"precision x padding ({args.steps} real batches of {cfg.train.batch_size}, mean width "
          f"{np.mean([tokens.lengths[r].max() for r in order]):.0f}; native bf16: {cpu_has_native_bf16()}; "
          f"{torch.get_num_threads()} threads)")
    summary(res)
    print(f"  bf16 over fp32, longest padding: {ratio(res, 'fp32 longest', 'bf16 longest')}")
    print(f"  bf16 over fp32, bucketed:        {ratio(res, 'fp32 buckets', 'bf16 buckets')}")
    print(f"  buckets over longest, bf16:      {ratio(res, 'bf16 longest', 'bf16 buckets')}")


def _busy(stop):
    os.sched_setaffinity(0, {0}) if hasattr(os, "sched_setaffinity") else None
    while not stop.is_set():
        pass


def lever_threads(args, data, tok):
    cfg, model = setup(args)
    tokens, order = batches_for(cfg, tok, data["train"].texts, args.steps)
    labels = torch.as_tensor(data["train"].labels)
    step = make_step(model, torch.bfloat16 if cpu_has_native_bf16() else None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def with_threads(n):
        def run():
            torch.set_num_threads(n)
            return time_steps(step, tokens, labels, order, "longest", 128)
        return run

    contenders = {f"{n} thread(s)": with_threads(n) for n in sorted({1, cores})}
    for c in contenders.values():
        c()
    res = interleaved(contenders, args.rounds)
    print(f"threads, idle machine ({cores} cores)")
    summary(res)
    if cores > 1:
        print(f"  {cores} threads over 1: {ratio(res, '1 thread(s)', f'{cores} thread(s)')}")
        stop = multiprocessing.Event()
        hog = multiprocessing.Process(target=_busy, args=(stop,), daemon=True)
        hog.start()
        time.sleep(1.0)
        try:
            res = interleaved(contenders, args.rounds)
        finally:
            stop.set()
            hog.join()
        print("threads, one core kept busy by another process (what hardware.free_cores avoids)")
        summary(res)
        print(f"  1 thread over {cores}: {ratio(res, f'{cores} thread(s)', '1 thread(s)')}")
    torch.set_num_threads(cores)


def lever_eval(args, data, tok):
    cfg, model = setup(args)
    model.eval()
    test = data["test"]
    tokens = Tokens(encode(tok, test.texts, cfg.model.max_length), tok.pad_token_id)

    def run(dtype, bs, sort):
        def go():
            t = time.perf_counter()
            if sort:
                logits_for_ids(model, tokens, bs, tok.pad_token_id, dtype=dtype)
            else:  # input order: each batch padded to its own longest row, no sorting
                with torch.inference_mode(), torch.autocast("cpu", dtype=dtype or torch.bfloat16,
                                                            enabled=dtype is not None):
                    for i in range(0, len(tokens), bs):
                        model(**tokens.batch(np.arange(i, min(i + bs, len(tokens)))))
            return len(tokens) / (time.perf_counter() - t)
        return go

    contenders = {"fp32 b64 sorted": run(None, 64, True), "bf16 b64 sorted": run(torch.bfloat16, 64, True),
                  "bf16 b256 sorted": run(torch.bfloat16, 256, True), "bf16 b64 input order": run(torch.bfloat16, 64, False)}
    for c in contenders.values():
        c()
    res = interleaved(contenders, max(2, args.rounds - 1))
    print(f"evaluation, {len(tokens)} test rows (rows/s)")
    summary(res, "rows/s")
    print(f"  bf16 over fp32 (b64 sorted):      {ratio(res, 'bf16 b64 sorted', 'fp32 b64 sorted')}")
    print(f"  b64 over b256 (bf16 sorted):      {ratio(res, 'bf16 b64 sorted', 'bf16 b256 sorted')}")
    print(f"  sorted over input order (bf16):   {ratio(res, 'bf16 b64 sorted', 'bf16 b64 input order')}")


def two_models(args, data, tok, title: str, a: tuple[str, dict], b: tuple[str, dict]) -> None:
    """Step time of the same batches through two adapter setups (a is the slower one expected)."""
    (name_a, over_a), (name_b, over_b) = a, b
    cfg, model_a = setup(args, **over_a)
    _, model_b = setup(args, **over_b)
    tokens, order = batches_for(cfg, tok, data["train"].texts, args.steps)
    labels = torch.as_tensor(data["train"].labels)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else None
    steps = {name_a: make_step(model_a, dtype), name_b: make_step(model_b, dtype)}
    contenders = {k: (lambda s=s: time_steps(s, tokens, labels, order, "buckets", 128)) for k, s in steps.items()}
    for c in contenders.values():
        c()
    res = interleaved(contenders, args.rounds)
    print(title)
    summary(res)
    print(f"  {name_b} over {name_a}: {ratio(res, name_a, name_b)}")


def lever_layers(args, data, tok):
    two_models(args, data, tok, "adapters only on the top layers (autograd then never enters the frozen bottom half)",
               ("all 6 layers", {"lora.layers": []}), ("top 3 layers", {"lora.layers": [3, 4, 5]}))


def lever_dropout(args, data, tok):
    two_models(args, data, tok, "dropout (none lets attention run as one fused kernel)",
               ("dropout 0.1", {"lora.dropout": 0.1, "train.base_dropout": -1}),
               ("no dropout", {"lora.dropout": 0.0, "train.base_dropout": 0.0}))


def lever_compile(args, data, tok):
    cfg, eager = setup(args)
    _, compiled = setup(args)
    tokens, order = batches_for(cfg, tok, data["train"].texts, args.steps, seed=1)
    labels = torch.as_tensor(data["train"].labels)
    dtype = torch.bfloat16 if cpu_has_native_bf16() else None
    eager_step = make_step(eager, dtype)
    compiled.forward = torch.compile(compiled.forward, dynamic=None)
    compiled_step = make_step(compiled, dtype)
    widths = sorted({int(tokens.lengths[r].max()) for r in order})
    t = time.perf_counter()
    first = time_steps(compiled_step, tokens, labels, order, "buckets", 128) * len(order)  # compiles every shape
    compile_s = time.perf_counter() - t
    res = interleaved({"eager": lambda: time_steps(eager_step, tokens, labels, order, "buckets", 128),
                       "compiled": lambda: time_steps(compiled_step, tokens, labels, order, "buckets", 128)},
                      args.rounds)
    print(f"torch.compile (inductor, bucketed widths; {len(widths)} raw widths in {len(order)} batches)")
    summary(res)
    gain = statistics.median(res["eager"]) - statistics.median(res["compiled"])
    overhead = first - statistics.median(res["compiled"]) * len(order)
    print(f"  compiled over eager, steady: {ratio(res, 'eager', 'compiled')}; first pass (compiling) {compile_s:.0f}s, "
          f"{overhead:.0f}s of it compile time")
    steps = 500
    print(f"  over a {steps}-step run: {'saves' if gain * steps > overhead else 'costs'} "
          f"{abs(gain * steps - overhead):.0f}s (gain {gain * steps:.0f}s against {overhead:.0f}s compiling)")


LEVERS = {"precision": lever_precision, "threads": lever_threads, "eval": lever_eval, "layers": lever_layers,
          "dropout": lever_dropout, "compile": lever_compile}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="*", choices=list(LEVERS), default=list(LEVERS))
    p.add_argument("--steps", type=int, default=6, help="training batches per measurement")
    p.add_argument("--rounds", type=int, default=4, help="interleaved rounds per lever")
    args = p.parse_args(argv)
    cfg = Config.from_yaml("minilm-default").replace(**BASELINE)
    data, tok = load_data(cfg), load_tokenizer(cfg)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, native bf16 {cpu_has_native_bf16()}",
          flush=True)
    for name in args.only:
        with contextlib.suppress(KeyboardInterrupt):
            t = time.perf_counter()
            LEVERS[name](args, data, tok)
            print(f"  ({name}: {time.perf_counter() - t:.0f}s)\n", flush=True)


if __name__ == "__main__":
    main()
