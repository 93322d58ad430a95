"""Load test for `budgetlora serve`: requests/s and latency percentiles on loopback.

    budgetlora serve RUN --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 500 --concurrency 1 16 --texts 1 16

Each scenario (texts per request x concurrency) sends at most --requests requests and stops after
--max-seconds, whichever comes first, so the whole run stays short. Texts come from the AG News test split when it
is available, else from a few built-in headlines.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time
from urllib.parse import urlparse

import httpx

FALLBACK = ["Stocks fell sharply as oil prices climbed to a record high on supply worries.",
            "The home team won the championship in extra time after a late equaliser.",
            "A new chip doubles battery life in laptops, the company said on Tuesday.",
            "Leaders met in Geneva to discuss the ceasefire and humanitarian corridors."]


def sample_texts(n: int, seed: int = 0) -> list[str]:
    try:
        import pandas as pd

        from budgetlora.data.readers import default_data_dir

        folder = default_data_dir()
        texts = pd.read_csv(folder / "test.csv.gz")["text"].astype(str).tolist()
    except Exception:  # no data copy here: the built-in texts still exercise the service
        texts = FALLBACK
    rng = random.Random(seed)
    return [rng.choice(texts) for _ in range(n)]


async def scenario(client: httpx.AsyncClient, pool: list[str], per_request: int, concurrency: int,
                   requests: int, max_seconds: float) -> dict:
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + max_seconds

    async def user(uid: int) -> None:
        nonlocal sent, errors
        rng = random.Random(uid)
        while sent < requests and time.perf_counter() < deadline:
            sent += 1
            body = {"texts": rng.sample(pool, per_request)}
            t = time.perf_counter()
            r = await client.post("/predict", json=body)
            latencies.append(time.perf_counter() - t)
            errors += r.status_code != 200

    t0 = time.perf_counter()
    await asyncio.gather(*(user(i) for i in range(concurrency)))
    wall = time.perf_counter() - t0
    q = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {"texts_per_request": per_request, "concurrency": concurrency, "requests": len(latencies),
            "errors": errors, "wall_s": round(wall, 2), "requests_per_s": round(len(latencies) / wall, 1),
            "texts_per_s": round(len(latencies) * per_request / wall, 1),
            "p50_ms": round(q[49] * 1000, 1), "p95_ms": round(q[94] * 1000, 1)}


async def main_async(args) -> list[dict]:
    pool = sample_texts(2000)
    results = []
    limits = httpx.Limits(max_connections=max(args.concurrency) + 4)
    async with httpx.AsyncClient(base_url=args.url, timeout=120, limits=limits) as client:
        info = (await client.get("/info")).json()
        print(f"run {info['run_id']} ({info['base_model']['name']}, max_length {info['base_model']['max_length']})")
        await client.post("/predict", json={"texts": pool[:16]})  # warm-up: first pass allocates
        for per_request in args.texts:
            for concurrency in args.concurrency:
                before = (await client.get("/info")).json()["batching"]
                res = await scenario(client, pool, per_request, concurrency, args.requests, args.max_seconds)
                after = (await client.get("/info")).json()["batching"]
                passes = after["forward_passes"] - before["forward_passes"]
                res["requests_per_pass"] = round((after["requests"] - before["requests"]) / max(passes, 1), 2)
                results.append(res)
                print(json.dumps(res), flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--requests", type=int, default=500, help="per scenario, at most")
    ap.add_argument("--max-seconds", type=float, default=20.0, help="per scenario, at most")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--texts", type=int, nargs="+", default=[1, 16], help="texts per request")
    ap.add_argument("--output", default="", help="also write the results as JSON here")
    args = ap.parse_args()
    if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        ap.error("this load test only targets a loopback address")
    results = asyncio.run(main_async(args))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
