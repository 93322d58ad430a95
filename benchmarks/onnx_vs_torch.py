"""Inference speed of one run on torch vs onnxruntime, in one process, same texts, same thread count.

    python benchmarks/onnx_vs_torch.py runs/<id> [--onnx DIR] [--threads 1 2] [--seconds 10]

Without --onnx the run is exported to a temporary folder first. For each thread count it reports single-text
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
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seconds", type=float, default=10.0, help="per measurement")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--output", default="", help="also write the results as JSON here")
    args = ap.parse_args()

    import torch

    import budgetlora
    from budgetlora.inference.export import export_onnx
    from budgetlora.inference.onnx_serve import OnnxClassifier

    onnx_dir = args.onnx
    tmp = None
    if not onnx_dir:
        tmp = tempfile.TemporaryDirectory()
        onnx_dir = str(Path(tmp.name) / "onnx")
        export_onnx(args.run, onnx_dir, log=lambda *a: None)
    texts = sample_texts(2000)
    torch_model = budgetlora.load(args.run, verify=False)
    max_length = torch_model.run.cfg.model.max_length
    print(f"run {args.run}: max_length {max_length}; {os.cpu_count()} CPUs; load average {os.getloadavg()}")
    results = []
    for threads in args.threads:
        torch.set_num_threads(threads)
        onnx_model = OnnxClassifier(onnx_dir, threads=threads)
        for name, model in (("torch", torch_model), ("onnxruntime", onnx_model)):
            before = os.getloadavg()[0]
            res = {"threads": threads, **measure(name, model.predict_proba, texts, args.seconds, args.batch),
                   "load_before": round(before, 2), "load_after": round(os.getloadavg()[0], 2)}
            results.append(res)
            print(json.dumps(res), flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))
    if tmp:
        tmp.cleanup()


if __name__ == "__main__":
    main()
