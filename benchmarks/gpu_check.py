"""What one GPU does with this project, measured through the product's own `train` / `predict` / `self-train`.

Here, where the shipped data and the embedded model are, make the folder the GPU machine needs (about 54 MB):

    python benchmarks/gpu_check.py --prepare gpu-carry

It holds mpnet-shape/ (MPNet's config and tokenizer, 0.7 MB), minilm-fp16/ (the embedded all-MiniLM-L6-v2 in fp16, widened to fp32 again before training), train.csv.gz
and test.csv.gz (the shipped AG News split) and competition.csv.gz (the 8,000 competition texts as a text column).
On the GPU machine, beside the checkout (torch, transformers, peft, accelerate, pandas, pyarrow, matplotlib are
enough; nothing is installed):

    PYTHONPATH=src python benchmarks/gpu_check.py --carry gpu-carry --out "$OUT"

Try it on a CPU first with `--smoke` (tiny sizes, a few minutes). Every result lands in --out as soon as it exists
(results.json rewritten after each step, log.txt line by line), so a run cut short still leaves what finished:

(a) throughput of `train` on RoBERTa-base shapes (random weights: speed does not depend on the values), LoRA r=8 on
    query/value + head, bf16, AG News lengths, per batch size and with torch.compile: training samples/s over the
    steps after warm-up, and the model-FLOPs utilisation against --peak-flops (H100 SXM bf16 dense: 989e12).
    FLOPs per padded row = width * (4 * N_linear + 2 * N_trainable_linear + 12 * L * width * d): forward 2N,
    activation gradients through frozen weights 2N, weight gradients only for the trainable matrices; attention
    scores and sums 12 * L * S * d per token with the backward. Widths are the padded ones the loop really ran.
(b) the embedded MiniLM, one epoch of the full shipped split, at the CPU defaults (batch 32) and at the GPU preset
    (configs/minilm-gpu.yaml): training time and test accuracy; then `predict` on the competition texts with the
    better run, plain and after one self-training round (submission_plain.csv, submission_selftrain.csv).
(c) the speed race (benchmarks/speed.py: the reference HF Trainer recipe vs budgetlora, each in its own process),
    output in speed.txt.
(d) MPNet-base's shapes (all-mpnet-base-v2's config and tokenizer are carried in mpnet-shape/, not its weights):
    the reference adapter, r=10 alpha 32 on q,v + head (962,308 trainable), batch 32 at the shipped split's lengths
    up to 512 tokens: training samples/s and peak memory, fp32 against bf16, eager against compiled.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TQDM_MININTERVAL", "5")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent


class Out:
    """The output folder: results.json rewritten after every step, log.txt appended line by line."""

    def __init__(self, folder: str):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.results: dict = {}

    def log(self, msg: str) -> None:
        print(msg, flush=True)
        with open(self.folder / "log.txt", "a") as f:
            f.write(msg + "\n")

    def put(self, key: str, value) -> None:
        self.results[key] = value
        tmp = self.folder / ".results.json.tmp"
        tmp.write_text(json.dumps(self.results, indent=2))
        os.replace(tmp, self.folder / "results.json")


# -- here: the carried folder ---------------------------------------------------------------------------------------
def prepare(folder: str) -> None:
    import pandas as pd
    from transformers import AutoModel, AutoTokenizer

    from budgetlora.adapters.architectures import resolve_name
    from budgetlora.config import Config
    from budgetlora.data.readers import default_data_dir, load_split

    dest = Path(folder)
    dest.mkdir(parents=True, exist_ok=True)
    src = resolve_name("minilm")
    AutoModel.from_pretrained(src, dtype=torch.float16).save_pretrained(dest / "minilm-fp16")
    AutoTokenizer.from_pretrained(src).save_pretrained(dest / "minilm-fp16")
    # MPNet's config and tokenizer only (its 438 MB of weights would not travel): (d) runs its shapes with random weights
    mpnet = Path(resolve_name("mpnet"))
    (dest / "mpnet-shape").mkdir(exist_ok=True)
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        shutil.copyfile(mpnet / name, dest / "mpnet-shape" / name)
    data = default_data_dir()
    if data is None:
        sys.exit("the shipped AG News copy was not found (set BUDGETLORA_DATA)")
    for name in ("train.csv.gz", "test.csv.gz"):
        shutil.copyfile(data / name, dest / name)
    cfg = Config()
    comp = data.parent / "agnews_kaggle" / "test_unlabelled.pkl"
    texts = load_split(str(comp), "test", cfg.data, 4, labelled=False).texts  # read through the safe unpickler
    pd.DataFrame({"text": texts}).to_csv(dest / "competition.csv.gz", index=False)
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest} ({size / 2**20:.1f} MiB): carry it with the checkout, then run there:\n"
          f"  PYTHONPATH=src python benchmarks/gpu_check.py --carry {folder} --out \"$OUT\"")


def widened(carry: Path) -> str:
    """The MiniLM in fp32 in a local folder: an fp16 copy would otherwise load, and train, in fp16."""
    from transformers import AutoModel, AutoTokenizer

    out = Path(tempfile.mkdtemp(prefix="minilm-fp32-"))
    AutoModel.from_pretrained(carry / "minilm-fp16", dtype=torch.float32).save_pretrained(out)
    AutoTokenizer.from_pretrained(carry / "minilm-fp16").save_pretrained(out)
    return str(out)


# -- (a) throughput -------------------------------------------------------------------------------------------------
def linear_params(model) -> tuple[int, int]:
    n = trainable = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            n += m.weight.numel()
            trainable += m.weight.numel() if m.weight.requires_grad else 0
    return n, trainable


def padded_row_flops(cfg, steps: range, n_linear: int, n_train: int, L: int, d: int) -> tuple[float, float, float]:
    """FLOPs, padded tokens and real tokens of the given steps, from the batches the loop itself draws."""
    from budgetlora.adapters.model import load_tokenizer
    from budgetlora.data.readers import load_data
    from budgetlora.data.tokens import Tokens, encode, length_grouped_batches, padded_width
    from budgetlora.training.loop import resolve_padding

    tc, ml = cfg.train, cfg.model.max_length
    tok = load_tokenizer(cfg)
    train = load_data(cfg)["train"]
    lengths = Tokens(encode(tok, train.texts, ml), tok.pad_token_id).lengths
    per_epoch = math.ceil(len(lengths) / tc.batch_size)
    padding = resolve_padding(tc.padding, "cuda" if torch.cuda.is_available() else "cpu")
    flops = padded = real = 0.0
    epochs: dict[int, list] = {}  # each epoch's batches, drawn once
    for step in steps:  # step s (1-based) ran batch s-1 of its epoch
        epoch, i = divmod(step - 1, per_epoch)
        if epoch not in epochs:
            epochs[epoch] = length_grouped_batches(lengths, tc.batch_size, tc.seed, epoch, tc.group_by_length)
        rows = epochs[epoch][i]
        w = padded_width(int(lengths[rows].max()), padding, ml)
        flops += len(rows) * w * (4 * n_linear + 2 * n_train + 12 * L * w * d)
        padded += len(rows) * w
        real += float(lengths[rows].sum())
    return flops, padded, real


def throughput(out: Out, carry: Path, tokenizer_dir: str, smoke: bool, peak: float) -> None:
    from budgetlora.config import Config

    steps = 6 if smoke else 80
    plan = [(4, False)] if smoke else [(32, False), (128, False), (256, False), (512, False), (256, True)]
    rows_out = []
    for batch, compiled in plan:
        cfg = Config().replace(**{
            "name": f"throughput b{batch}{' compiled' if compiled else ''}",
            "model.name": "roberta-base", "model.random_init": True, "model.tokenizer": tokenizer_dir,
            "model.max_length": 128, "lora.r": 8, "lora.alpha": 16, "lora.targets": "q,v",
            "data.train": str(carry / "train.csv.gz"), "data.test": str(carry / "test.csv.gz"),
            "data.train_limit": batch * steps + 2000, "data.val_fraction": 0.02, "data.test_limit": 200,
            "train.batch_size": batch, "train.max_steps": steps, "train.eval_every": steps,
            "train.compile": compiled})
        row = measure(out, cfg, smoke, peak, f"roberta-base shapes, batch {batch}{' compiled' if compiled else ''}")
        if row:
            rows_out.append(row)
        out.put("throughput", rows_out)


def measure(out: Out, cfg, smoke: bool, peak: float, label: str) -> dict | None:
    """One short `train` of cfg: training samples/s over the steps after warm-up, MFU, padding, peak memory."""
    from budgetlora.adapters.model import build
    from budgetlora.training.train import train

    batch, compiled = cfg.train.batch_size, cfg.train.compile
    records = []
    t = time.time()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        run = train(cfg, root=tempfile.mkdtemp(prefix="tp-"), force=True, on_record=records.append)
    except Exception as e:  # one failed setting must not hide the others
        out.log(f"[{label}] failed: {e.__class__.__name__}: {str(e)[:300]}")
        return None
    wall = time.time() - t
    logged = [r for r in records if "train_loss" in r]
    warm = 2 if smoke else (30 if compiled else 10)
    first = next(r for r in logged if r["step"] >= warm)
    last = logged[-1]
    dt = last["elapsed_s"] - first["elapsed_s"]
    model, _ = build(cfg)
    n_linear, n_train = linear_params(model)
    L, d = model.config.num_hidden_layers, model.config.hidden_size
    del model
    flops, padded, real = padded_row_flops(cfg, range(first["step"] + 1, last["step"] + 1), n_linear, n_train, L, d)
    sps = (last["step"] - first["step"]) * batch / dt
    metrics = json.loads((run / "metrics.json").read_text())
    row = {"batch": batch, "compile": compiled, "precision": metrics.get("precision"),
           "samples_per_s": round(sps, 1), "tokens_per_s": round(real / dt), "padding_share": round(1 - real / padded, 4),
           "tflops": round(flops / dt / 1e12, 2), "mfu": round(flops / dt / peak, 4),
           "timed_steps": last["step"] - first["step"], "first_steps_s": round(first["elapsed_s"], 2),
           "run_wall_s": round(wall, 1), "peak_rss_mb": metrics.get("peak_rss_mb"),
           "peak_gpu_mb": metrics.get("peak_gpu_mb")}
    if torch.cuda.is_available():
        row["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    out.log(f"[{label}] {sps:,.0f} samples/s, MFU {row['mfu']:.2%}, padding {row['padding_share']:.1%}, first "
            f"{first['step']} steps {first['elapsed_s']:.1f}s" + (f", peak {row['peak_gpu_gib']} GiB"
                                                                  if "peak_gpu_gib" in row else ""))
    return row


# -- (d) MPNet-base shapes (all-mpnet-base-v2's config and tokenizer, random weights) --------------------------------
def mpnet_shapes(out: Out, carry: Path, smoke: bool, peak: float) -> None:
    """The reference adapter (LoRA r=10, alpha 32 on q,v + the RoBERTa-shaped head: 962,308 trainable) on MPNet's
    shapes at the shipped split's lengths (up to 512 tokens, batches grouped by length), batch 32 as the reference
    trained: fp32 against bf16, eager against compiled. Speed and memory are exact with random weights; accuracy is
    not, and is not reported."""
    steps = 6 if smoke else 60
    settings = [("fp32", False)] if smoke else [("fp32", False), ("bf16", False), ("bf16", True), ("fp32", True)]
    rows = []
    for precision, compiled in settings:
        cfg = _carried(carry, "mpnet-shape").replace(**{
            "name": f"mpnet {precision}{' compiled' if compiled else ''}", "model.random_init": True,
            "model.max_length": 32 if smoke else 512, "lora.r": 10, "lora.alpha": 32, "lora.targets": "q,v",
            "lora.dropout": 0.0, "train.base_dropout": 0.0, "train.batch_size": 4 if smoke else 32,
            "train.precision": precision, "train.compile": compiled,
            "data.train_limit": (4 if smoke else 32) * steps + 400, "data.val_fraction": 0.02,
            "data.test_limit": 200, "train.max_steps": steps, "train.eval_every": steps})
        row = measure(out, cfg, smoke, peak, f"d: mpnet shapes {precision}{' compiled' if compiled else ''}")
        if row:
            rows.append(row)
            out.put("mpnet_shapes", rows)


def _carried(carry: Path, model: str):
    from budgetlora.config import Config

    return Config().replace(**{"model.name": str(carry / model), "data.train": str(carry / "train.csv.gz"),
                               "data.test": str(carry / "test.csv.gz")})


# -- (b) MiniLM: accuracy, predictions, self-training ---------------------------------------------------------------
def minilm(out: Out, carry: Path, model_dir: str, smoke: bool) -> None:
    from budgetlora.config import Config
    from budgetlora.inference.predict import predict
    from budgetlora.runs import read_json
    from budgetlora.shift.selftrain import self_train
    from budgetlora.training.train import train

    data = {"model.name": model_dir, "data.train": str(carry / "train.csv.gz"),
            "data.test": str(carry / "test.csv.gz")}
    if smoke:
        data.update({"data.train_limit": 400, "data.test_limit": 200, "train.max_steps": 6, "model.max_length": 32})
    gpu = Config.from_yaml(HERE.parent / "configs" / "minilm-gpu.yaml")
    presets = {"cpu-default": Config(), "gpu-preset": gpu,
               "gpu-batch256": gpu.replace(**{"train.batch_size": 256, "train.lr": 4e-3, "train.eval_every": 50})}
    root = Path(tempfile.mkdtemp(prefix="minilm-"))
    results, best = {}, None
    for name, base in presets.items():
        cfg = base.replace(**data, **({"train.eval_every": 3} if smoke else {}))
        t = time.time()
        run = train(cfg, root=root, force=True)
        m = read_json(run / "metrics.json")
        results[name] = {"batch": cfg.train.batch_size, "lr": cfg.train.lr, "steps": m["steps"],
                         "train_time_s": m["train_time_s"], "wall_s": round(time.time() - t, 1),
                         "val_accuracy": m["val_accuracy"], "test_accuracy": m["test_accuracy"],
                         "test_rows": sum(map(sum, m["test_confusion_matrix"])), "run": run.name}
        out.log(f"[b] MiniLM {name} (batch {cfg.train.batch_size}, lr {cfg.train.lr}): {m['steps']} steps, "
                f"train {m['train_time_s']:.1f}s, val {m['val_accuracy']:.4f}, test {m['test_accuracy']:.4f}")
        out.put("minilm", results)
        if best is None or m["val_accuracy"] > results[best]["val_accuracy"]:
            best = name
    run = root / results[best]["run"]
    comp = str(carry / "competition.csv.gz")
    if smoke:  # the first 200 texts
        import pandas as pd

        comp = str(root / "competition-head.csv")
        pd.read_csv(carry / "competition.csv.gz", nrows=200).to_csv(comp, index=False)
    t = time.time()
    labels = predict(run, comp, out.folder / "submission_plain.csv").labels
    results["predict_plain"] = {"run": best, "rows": len(labels), "seconds": round(time.time() - t, 1),
                                "label_counts": [int((labels == c).sum()) for c in range(4)]}
    out.log(f"[b] predict ({best}) on {len(labels):,} competition texts: {results['predict_plain']}")
    out.put("minilm", results)
    t = time.time()
    (child,) = self_train(run, comp, root / "self-train", rounds=1, threshold=0.3 if smoke else 0.9,
                          overrides={"train.max_steps": 6} if smoke else None)
    m = read_json(child / "metrics.json")
    labels = predict(child, comp, out.folder / "submission_selftrain.csv").labels
    results["self_train"] = {"seconds": round(time.time() - t, 1), "test_accuracy": m["test_accuracy"],
                             "val_accuracy": m["val_accuracy"], "steps": m["steps"],
                             "label_counts": [int((labels == c).sum()) for c in range(4)]}
    out.log(f"[b] after one self-training round: {results['self_train']}")
    out.put("minilm", results)


# -- (c) the speed race ---------------------------------------------------------------------------------------------
def race(out: Out, carry: Path, model_dir: str, smoke: bool) -> None:
    size = ["--train-limit", "300", "--test-limit", "100", "--epochs", "1", "--ref-eval-steps", "0"] if smoke else \
        ["--train-limit", "4000", "--test-limit", "1000", "--epochs", "2", "--ref-eval-steps", "20"]
    sets = ["train.lr=2e-3", "train.epochs=1", "train.warmup=0.1", "lora.targets=q,v",
            f"train.eval_every={4 if smoke else 10}", f"data.train={carry / 'train.csv.gz'}",
            f"data.test={carry / 'test.csv.gz'}"] + (["train.max_steps=8"] if smoke else [])
    cmd = [sys.executable, str(HERE / "speed.py"), "--model", model_dir, *size, "--set", *sets]
    t = time.time()
    with open(out.folder / "speed.txt", "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "TQDM_DISABLE": "1"}).returncode
    lines = (out.folder / "speed.txt").read_text().splitlines()
    ratios = [x.strip() for x in lines if x.startswith("  ")]
    out.put("speed_race", {"exit": rc, "seconds": round(time.time() - t, 1), "ratios": ratios})
    out.log(f"[c] speed race exit {rc} in {time.time() - t:.0f}s: " + "; ".join(ratios))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prepare", metavar="DIR", help="write the folder to carry to the GPU machine, then exit")
    p.add_argument("--carry", metavar="DIR", help="the folder --prepare wrote")
    p.add_argument("--out", metavar="DIR", help="where results land as they come")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, to try the script on a CPU")
    p.add_argument("--peak-flops", type=float, default=989e12, help="the card's dense bf16 peak (H100 SXM: 989e12)")
    p.add_argument("--only", choices=["throughput", "mpnet", "minilm", "race"], action="append", default=[])
    args = p.parse_args(argv)
    if args.prepare:
        return prepare(args.prepare)
    if not (args.carry and args.out):
        p.error("--carry and --out are needed (or --prepare)")
    out, carry = Out(args.out), Path(args.carry)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    out.put("machine", {"device": device, "torch": torch.__version__, "smoke": args.smoke})
    out.log(f"device {device}, torch {torch.__version__}{', smoke sizes' if args.smoke else ''}")
    model_dir = widened(carry)
    steps = args.only or ["throughput", "mpnet", "minilm", "race"]
    for name in steps:
        t = time.time()
        try:
            if name == "throughput":
                throughput(out, carry, model_dir, args.smoke, args.peak_flops)
            elif name == "mpnet":
                mpnet_shapes(out, carry, args.smoke, args.peak_flops)
            elif name == "minilm":
                minilm(out, carry, model_dir, args.smoke)
            else:
                race(out, carry, model_dir, args.smoke)
        except Exception as e:  # later steps still run; the failure is on record
            out.log(f"[{name}] failed after {time.time() - t:.0f}s: {e.__class__.__name__}: {str(e)[:500]}")
            out.put(f"{name}_error", f"{e.__class__.__name__}: {str(e)[:500]}")


if __name__ == "__main__":
    main()
