"""Inference speed of one run on torch vs onnxruntime (fp32 and int8), in one process, same texts, same thread count;
and the int8 export's accuracy against the fp32 one on the whole test split.

    python benchmarks/onnx_vs_torch.py runs/<id> [--onnx DIR] [--int8 DIR] [--threads 1 2] [--seconds 10]

Without --onnx / --int8 the run is exported (`export --onnx`, `--quantize int8`) to a temporary folder first. The
accuracy of both exports on every row of the shipped test split comes first (a 95% bootstrap interval over the
rows, the paired difference, the share of labels that agree). Then, for each thread count, it reports single-text
latency (p50/p95 over one text at a time) and batch throughput (texts/s in batches of --batch texts), plus the load
average before and after: on a shared CPU the numbers only mean something next to it. For the HTTP service end to
end, run `budgetlora serve RUN` and `budgetlora serve --backend onnx DIR` in turn under benchmarks/serve_load.py.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from serve_load import sample_texts  # noqa: E402


def timed(fn, texts: list[str], seconds: float, batch: int) -> tuple[list[float], int]:
    """Call fn on consecutive slices of `batch` texts for about `seconds`; per-call seconds and texts done."""
    fn(texts[:batch])  # warm-up: first call allocates
    times, done, i = [], 0, 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        chunk = texts[i:i + batch] or texts[:batch]
        i = (i + batch) % len(texts)
        t = time.perf_counter()
        fn(chunk)
        times.append(time.perf_counter() - t)
        done += len(chunk)
    return times, done


def measure(name: str, fn, texts: list[str], seconds: float, batch: int) -> dict:
    single, _ = timed(fn, texts, seconds, 1)
    q = statistics.quantiles(single, n=20)
    many, done = timed(fn, texts, seconds, batch)
    return {"backend": name, "single_p50_ms": round(statistics.median(single) * 1000, 2),
            "single_p95_ms": round(q[18] * 1000, 2), "single_texts_per_s": round(len(single) / sum(single), 1),
            f"batch{batch}_texts_per_s": round(done / sum(many), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run")
    ap.add_argument("--onnx", default="", help="an `export --onnx` folder of the same run (default: export now)")
    ap.add_argument("--int8", default="", help="an `export --onnx --quantize int8` folder of it (default: export now)")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--output", default="", help="also write the results as JSON here")
    args = ap.parse_args()

    import torch

    import budgetlora
    from budgetlora.inference.export import export_onnx
    from budgetlora.inference.onnx_serve import OnnxClassifier

    tmp = tempfile.TemporaryDirectory()
    onnx_dir, int8_dir = args.onnx, args.int8
    if not onnx_dir:
        onnx_dir = str(Path(tmp.name) / "onnx")
        export_onnx(args.run, onnx_dir)
    if not int8_dir:
        int8_dir = str(Path(tmp.name) / "int8")
        export_onnx(args.run, int8_dir, quantize="int8")
    accuracy(onnx_dir, int8_dir)
    texts = sample_texts(2000)
    torch_model = budgetlora.load(args.run, verify=False)
    max_length = torch_model.run.cfg.model.max_length
    print(f"run {args.run}: max_length {max_length}; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        onnx_model = OnnxClassifier(onnx_dir, threads=threads)
        int8_model = OnnxClassifier(int8_dir, threads=threads)
        for name, model in (("torch", torch_model), ("onnxruntime", onnx_model), ("onnxruntime int8", int8_model)):
            before = os.getloadavg()[0]
            res = {"threads": threads, **measure(name, model.predict_proba, texts, args.seconds, args.batch),
                   "load_before": round(before, 2), "load_after": round(os.getloadavg()[0], 2)}
            results.append(res)
            print(json.dumps(res), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    tmp.cleanup()


def accuracy(onnx_dir: str, int8_dir: str) -> None:
    """Both exports on every row of the shipped test split: accuracy with its interval, the paired difference."""
    import numpy as np
    import pandas as pd

    from budgetlora.data.readers import default_data_dir
    from budgetlora.experiments.stats import paired, row_interval
    from budgetlora.inference.onnx_serve import OnnxClassifier

    test = pd.read_csv(default_data_dir() / "test.csv.gz")
    gold = test["label"].to_numpy()
    labels = {}
    for name, folder in (("fp32", onnx_dir), ("int8", int8_dir)):
        t = time.perf_counter()
        labels[name] = OnnxClassifier(folder).logits(test["text"].astype(str).tolist()).argmax(1)
        iv = row_interval(labels[name] == gold)
        print(f"onnxruntime {name}: accuracy {iv.mean:.4f} [{iv.low:.4f}, {iv.high:.4f}] on {len(gold):,} test rows "
              f"({time.perf_counter() - t:.1f}s)", flush=True)
    d = paired(labels["int8"] == gold, labels["fp32"] == gold)
    print(f"int8 - fp32: {100 * d.difference.mean:+.2f} points [{100 * d.difference.low:+.2f}, "
          f"{100 * d.difference.high:+.2f}], McNemar p {d.mcnemar_p:.3g}; labels agree on "
          f"{float(np.mean(labels['int8'] == labels['fp32'])):.2%}", flush=True)


if __name__ == "__main__":
    main()
