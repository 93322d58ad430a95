"""Many runs in one server: resident memory with 1, 5 and 10 runs on one base, and texts/s of mixed traffic over
all of them against traffic to one run alone, side by side on the same server.

    python benchmarks/serve_many.py                      # trains 10 short runs of the minilm-default shape first
    python benchmarks/serve_many.py --runs FOLDER        # serves the runs in FOLDER (trained there first if missing)

Each server is a real `budgetlora serve` process on loopback; its memory is read from /proc after the runs are
loaded and verified, and again after every served run has answered requests (VmRSS now, VmHWM the peak). The
throughput scenarios (`serve_load.scenario`) alternate one-run and mixed traffic, `--repeats` times each, so that
drift on a shared machine falls on both. The short runs have the preset's adapter and head (LoRA r=16 on the top
three layers, 333,316 trainable parameters) but train for a few steps: memory and speed depend on the shapes,
not on how well a run classifies.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_load import sample_texts, scenario  # noqa: E402


def short_runs(n: int, root: Path) -> list[Path]:
    """n runs of the minilm-default preset's shape, a few steps each, on different seeds (different adapters)."""
    from budgetlora.config import Config
    from budgetlora.training.train import train

    preset = Config.from_yaml(Path(__file__).resolve().parent.parent / "configs" / "minilm-default.yaml")
    out = []
    for seed in range(n):
        cfg = preset.replace(**{"train.seed": seed, "train.max_steps": 4, "train.probe_steps": 0,
                                "data.train_limit": 400, "data.test_limit": 200, "train.eval_every": 4})
        t = time.perf_counter()
        out.append(train(cfg, root=root))
        print(f"trained {out[-1].name} (seed {seed}) in {time.perf_counter() - t:.0f}s", flush=True)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def memory_kb(pid: int) -> dict:
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


class Server:
    """`budgetlora serve RUNS...` in a child process, on a free loopback port."""

    def __init__(self, runs: list[Path], threads: int):
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
        cmd = [str(Path(sys.executable).parent / "budgetlora"), "serve", *map(str, runs), "--port", str(self.port),
               "--batch-wait-ms", "5", "--max-batch", "64"]
        # its output to a file: a pipe nobody reads fills with access-log lines and then blocks the server
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"
        self.t0 = time.perf_counter()
        deadline = time.monotonic() + 600
        while True:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"server exited: {self.log.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not start in 10 minutes")
            time.sleep(0.5)
        self.load_s = time.perf_counter() - self.t0

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)
        self.log.close()


def touch_every_model(url: str, models: list[str], texts: list[str]) -> None:
    for m in models:
        for _ in range(3):
            r = httpx.post(f"{url}/predict", json={"texts": texts[:16], "model": m}, timeout=120)
            r.raise_for_status()


async def traffic(url: str, models: list[str], pool: list[str], per_request: int, concurrency: int,
                  requests: int, max_seconds: float) -> dict:
    """One scenario: each request names one of `models`, drawn at random."""
    limits = httpx.Limits(max_connections=concurrency + 4)
    rng = random.Random(0)

    class Naming(httpx.AsyncClient):  # adds the model to every /predict body serve_load.scenario sends
        async def post(self, path, json=None, **kw):
            return await super().post(path, json={**json, "model": rng.choice(models)}, **kw)

    async with Naming(base_url=url, timeout=120, limits=limits) as client:
        before = (await client.get("/info")).json()["batching"]
        res = await scenario(client, pool, per_request, concurrency, requests, max_seconds)
        after = (await client.get("/info")).json()["batching"]
    passes = max(after["forward_passes"] - before["forward_passes"], 1)
    res["requests_per_pass"] = round((after["requests"] - before["requests"]) / passes, 2)
    res["multi_model_passes"] = after["mixed_model_passes"] - before["mixed_model_passes"]
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", default="", help="a folder of finished runs on one base; short ones are trained into it "
                                               "when it holds too few (default: a temporary folder)")
    ap.add_argument("--counts", type=int, nargs="+", default=[1, 5, 10], help="runs per server, for memory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--texts", type=int, default=4, help="texts per request")
    ap.add_argument("--requests", type=int, default=400, help="per scenario, at most")
    ap.add_argument("--max-seconds", type=float, default=25.0, help="per scenario, at most")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--output", default="", help="also write the results as JSON here")
    args = ap.parse_args()

    from budgetlora.runs import list_runs

    tmp = tempfile.TemporaryDirectory(prefix="serve-many-")
    folder = Path(args.runs or tmp.name)
    runs = list_runs(folder) if folder.is_dir() else []
    if len(runs) < max(args.counts):  # trained into the folder, so that a second measurement reuses them
        runs = short_runs(max(args.counts), folder)
    pool = sample_texts(2000)
    results = {"memory": [], "traffic": []}
    for n in args.counts:
        server = Server(runs[:n], args.threads)
        try:
            loaded = memory_kb(server.proc.pid)
            models = [m["model"] for m in httpx.get(f"{server.url}/info").json()["models"]]
            touch_every_model(server.url, models, pool)
            served = memory_kb(server.proc.pid)
            row = {"runs": n, "load_s": round(server.load_s, 1), "rss_loaded_mb": round(loaded["VmRSS"] / 1024, 1),
                   "rss_served_mb": round(served["VmRSS"] / 1024, 1), "peak_mb": round(served["VmHWM"] / 1024, 1)}
            results["memory"].append(row)
            print(json.dumps(row), flush=True)
            if n == max(args.counts):
                for rep in range(args.repeats):
                    for label, names in (("one run", models[:1]), (f"mixed over {n}", models)):
                        res = asyncio.run(traffic(server.url, names, pool, args.texts, args.concurrency,
                                                  args.requests, args.max_seconds))
                        res = {"traffic": label, "repeat": rep, **res}
                        results["traffic"].append(res)
                        print(json.dumps(res), flush=True)
        finally:
            server.stop()
    one = results["memory"][0]
    for row in results["memory"]:
        print(f"{row['runs']:>3} runs: RSS {row['rss_served_mb']:.0f} MB after serving "
              f"({row['rss_served_mb'] / one['rss_served_mb']:.2f}x of {one['runs']}), peak {row['peak_mb']:.0f} MB, "
              f"loaded and verified in {row['load_s']}s")
    by = {}
    for r in results["traffic"]:
        by.setdefault(r["traffic"], []).append(r["texts_per_s"])
    for label, values in by.items():
        spread = f" (runs {', '.join(map(str, values))})" if len(values) > 1 else ""
        print(f"{label}: {statistics.median(values):.1f} texts/s median{spread}")
    if len(by) == 2:
        (a, x), (b, y) = by.items()
        ratios = [q / p for p, q in zip(x, y)]
        print(f"{b} / {a}: {statistics.median(ratios):.2f}x median, pairs {', '.join(f'{r:.2f}' for r in ratios)}")
    if args.output:
        Path(args.output).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
