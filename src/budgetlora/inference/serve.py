"""`budgetlora serve RUN [RUN ...]`: an HTTP service around trained runs, with micro-batching of concurrent requests.

One worker task owns the models. Requests put their texts, and the run they name, on an asyncio queue; the worker
takes whatever is waiting (up to `serve.max_batch` texts, after at most `serve.batch_wait_ms`), runs the forward
pass on a single inference thread (one pass for runs whose adapters peft can mix, `served.ServedRuns.logits`), and
hands each request its slice of the result. Under load, requests that arrive while a pass runs are merged into the
next one, so throughput grows with concurrency instead of queueing one pass per request.
GET / answers a page (`page`) that classifies a text with a run picked from those served, through POST /predict.
"""
from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Callable

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictStr, create_model, field_validator

from budgetlora import runs
from budgetlora.config.use import ServeConfig
from budgetlora.errors import ConfigError
from budgetlora.inference.page import POLICY, render
from budgetlora.inference.served import ServedRuns, run_folders
from budgetlora.tasks import set_ids, sigmoid, softmax

if TYPE_CHECKING:  # only for annotations: the ONNX backend serves without importing torch (which api pulls in)
    from budgetlora.inference.classifier import Classifier

logger = logging.getLogger(__name__)
INFO_METRICS = ("val_accuracy", "val_loss", "val_macro_f1", "test_accuracy", "test_loss", "test_macro_f1",
                "trainable_params", "budget", "steps", "best_step", "train_time_s", "wall_time_s")


@dataclass
class BatchStats:
    forward_passes: int = 0
    requests: int = 0
    texts: int = 0
    merged_passes: int = 0  # passes that served more than one request
    max_requests_per_pass: int = 0
    mixed_model_passes: int = 0  # passes that served more than one model

    def as_dict(self) -> dict:
        return dict(self.__dict__)


@dataclass
class MicroBatcher:
    """Queue + one worker task. `fn([(key, texts), ...]) -> [rows, ...]` answers a pass's requests (the key: the
    model a request names) and runs on one thread, so torch is never entered concurrently."""

    fn: Callable[[list[tuple[object, list[str]]]], list[np.ndarray]]
    max_batch: int
    wait_s: float
    stats: BatchStats = field(default_factory=BatchStats)

    def __post_init__(self):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task: asyncio.Task | None = None
        self._carry = None  # a request that did not fit the previous pass

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="micro-batcher")

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self._executor.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def submit(self, texts: list[str], key: object = None) -> np.ndarray:
        fut = asyncio.get_running_loop().create_future()
        await self._queue.put((texts, fut, key))
        return await fut

    async def _gather(self, first) -> list:
        """`first` plus whatever else fits in max_batch texts: queued now, or arriving within wait_s."""
        items, n = [first], len(first[0])
        deadline = asyncio.get_running_loop().time() + self.wait_s
        while n < self.max_batch:
            try:
                nxt = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                left = deadline - asyncio.get_running_loop().time()
                if left <= 0:
                    break
                try:
                    nxt = await asyncio.wait_for(self._queue.get(), left)
                except asyncio.TimeoutError:
                    break
            if n + len(nxt[0]) > self.max_batch:
                self._carry = nxt  # too big to join this pass; it opens the next one
                break
            items.append(nxt)
            n += len(nxt[0])
        return items

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            first, self._carry = self._carry, None
            if first is None:
                first = await self._queue.get()
            items = await self._gather(first)
            items = [it for it in items if not it[1].done()]  # callers that went away need no pass
            if not items:
                continue
            try:
                rows = await loop.run_in_executor(self._executor, self.fn, [(k, ts) for ts, _, k in items])
            except Exception as e:  # a failed pass fails its requests, never the worker
                for _, f, _ in items:
                    if not f.done():
                        f.set_exception(e)
                continue
            s = self.stats
            s.forward_passes += 1
            s.requests += len(items)
            s.texts += sum(len(ts) for ts, _, _ in items)
            s.merged_passes += len(items) > 1
            s.mixed_model_passes += len({id(k) for _, _, k in items}) > 1
            s.max_requests_per_pass = max(s.max_requests_per_pass, len(items))
            for (_, f, _), got in zip(items, rows):
                if not f.done():
                    f.set_result(got)


class BodySizeLimit:
    """Pure ASGI middleware: a body over `limit` bytes gets 413 before any of it is parsed.

    Trusts neither Content-Length nor its absence: the body is read up to the limit and then replayed to the app.
    """

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._reject(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            chunks.append(msg.get("body", b""))
            size += len(chunks[-1])
            more = msg.get("more_body", False)
            if size > self.limit:
                return await self._reject(scope, receive, send)
        body, replayed = b"".join(chunks), False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _reject(self, scope, receive, send):
        await JSONResponse({"error": f"request body over the limit of {self.limit:,} bytes"},
                           status_code=413)(scope, receive, send)


class PredictResponse(BaseModel):
    model: str = Field(description="the run id of the model that answered")
    labels: list[int] = Field(description="per text, the most probable label")
    classes: list[str] = Field(description="class name of each predicted label")
    probabilities: list[list[float]] = Field(description="per text, one probability per class (in /info order): "
                                                         "a softmax, or for a multi-label run one sigmoid per label")
    label_sets: list[list[int]] | None = Field(None, description="multi-label runs only: per text, the labels whose "
                                                                 "probability reaches the run's threshold for them")
    class_sets: list[list[str]] | None = Field(None, description="multi-label runs only: the class names of "
                                                                 "label_sets")


def answer(rows: np.ndarray, names: list[str], thresholds: list[float] | None = None) -> dict:
    """The /predict body for a pass's rows: softmax probabilities, or with a multi-label run's `thresholds` its
    logits, whose label sets are taken exactly as `Classifier.predict_sets` takes them."""
    if thresholds is not None:
        sets = set_ids(rows, thresholds)
        return {**answer(sigmoid(rows), names), "label_sets": sets,
                "class_sets": [[names[i] for i in s] for s in sets]}
    labels = rows.argmax(axis=1).tolist()
    return {"labels": labels, "classes": [names[i] for i in labels], "probabilities": rows.tolist()}


def request_model(limits: ServeConfig, names: list[str] = ()) -> type[BaseModel]:
    """The request schema, with this server's limits baked in (so they also show in the OpenAPI schema); `names`:
    the served models, for the description of `model`."""
    text = Annotated[StrictStr, Field(min_length=1, max_length=limits.max_chars)]

    def not_blank(cls, texts: list[str]) -> list[str]:
        blank = [i for i, t in enumerate(texts) if not t.strip()]
        if blank:
            raise ValueError(f"text {blank[0]} is blank")
        return texts

    return create_model(
        "PredictRequest",
        __config__=ConfigDict(extra="forbid"),
        __validators__={"not_blank": field_validator("texts")(classmethod(not_blank))},
        texts=(list[text], Field(min_length=1, max_length=limits.max_texts,
                                 description=f"1 to {limits.max_texts} non-blank texts of at most "
                                             f"{limits.max_chars:,} characters")),
        model=(StrictStr | None, Field(None, max_length=200,
                                       description="the served model to answer with: a run id (or its name or "
                                                   "folder name); the first served when left out"
                                                   + (f" ({', '.join(names[:20])})" if names else ""))),
    )


def _public(name_or_path: str | None, show_paths: bool) -> str | None:
    """A hub id as it is; a local path cut to its last folder, so that clients do not learn the server's layout."""
    if not name_or_path or show_paths:
        return name_or_path
    p = Path(name_or_path)
    local = p.is_absolute() or p.exists() or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1
    return p.name if local else name_or_path


def run_info(classifier: Classifier, show_paths: bool = False) -> dict:
    """What /info reports about the run: base model, adapter config, size and metrics. Paths on the server are
    reduced to their last folder's name unless `show_paths` (the operator's choice, `serve --show-paths`)."""
    if hasattr(classifier, "info"):  # an ONNX export describes itself: it has no adapter_config.json
        return classifier.info(show_paths)
    path = classifier.path
    adapter = runs.read_json(path / "adapter_config.json")
    metrics, cfg = classifier.run.metrics, classifier.run.cfg
    base_path = _public(adapter.get("base_model_name_or_path"), show_paths)
    adapter = {**adapter, "base_model_name_or_path": base_path}
    return {
        "run": str(path.resolve()) if show_paths else path.resolve().name,
        "run_id": metrics.get("run_id", cfg.run_id), "name": cfg.name,
        "base_model": {"name": cfg.model.name, "path": base_path, "max_length": cfg.model.max_length},
        "class_names": classifier.class_names,
        "trainable_params": metrics.get("trainable_params"),
        "metrics": {k: metrics[k] for k in INFO_METRICS if k in metrics},
        "adapter_config": adapter,
    }


def _error_text(errors: list[dict]) -> str:
    parts = []
    for e in errors:
        if e.get("type") == "json_invalid":  # its loc is a character offset, not a field
            parts.append(f"body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})")
            continue
        if e.get("type") == "model_attributes_type":
            parts.append('body must be a JSON object like {"texts": ["..."]}')
            continue
        where = ".".join(str(x) for x in e.get("loc", ()) if x != "body")
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts[:5]) + (f" (+{len(parts) - 5} more)" if len(parts) > 5 else "")


def create_app(served: ServedRuns | Classifier, settings: ServeConfig | None = None) -> FastAPI:
    """The service for loaded runs (`ServedRuns`, or one classifier) under `settings` (the serve: section of the
    config: limits, batching, what /info shows; host, port and backend are for `serve`); the defaults when None."""
    settings = settings or ServeConfig()
    served = served if isinstance(served, ServedRuns) else ServedRuns([served])
    PredictRequest = request_model(settings, [r.name for r in served.runs])
    models = [{"model": r.name, "aliases": list(r.aliases), **run_info(r.classifier, show_paths=settings.show_paths)}
              for r in served.runs]
    info = {**{k: v for k, v in models[0].items() if k not in ("model", "aliases")}, "default_model": models[0]["model"],
            "models": models}

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        app.state.batcher = MicroBatcher(served.logits, settings.max_batch, settings.batch_wait_ms / 1000)
        app.state.batcher.start()
        yield
        await app.state.batcher.stop()

    names = ", ".join(m["model"] for m in models)
    app = FastAPI(title="budgetlora", version="0.1.0", lifespan=lifespan,
                  description=f"Text classification with {'run' if len(models) == 1 else 'runs'} {names} "
                              f"({', '.join(dict.fromkeys(m['base_model']['name'] or '' for m in models))})")
    app.state.settings = settings
    app.state.served = served
    app.add_middleware(BodySizeLimit, limit=settings.body_limit)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        # drop the echoed input: it can be a 10 MB text
        errors = [{k: v for k, v in e.items() if k not in ("input", "url")} for e in exc.errors()]
        return JSONResponse({"error": _error_text(errors), "detail": jsonable_encoder(errors)}, status_code=422)

    @app.get("/health")
    async def health():
        ok = app.state.batcher.alive
        return JSONResponse({"status": "ok" if ok else "inference worker stopped"}, status_code=200 if ok else 503)

    page = render(info)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def get_page():
        return HTMLResponse(page, headers={"content-security-policy": POLICY})

    @app.get("/info")
    async def get_info():
        return {**info, "limits": settings.limits,
                "batching": {**app.state.batcher.stats.as_dict(), "groups": served.batching()}}

    async def predict(body):
        run = served.find(body.model)
        if run is None:
            return JSONResponse({"error": f"no model {body.model!r} is served here; served: {names}"},
                                status_code=404)
        rows = await app.state.batcher.submit(body.texts, run)
        thresholds = run.thresholds
        return {"model": run.name, **answer(rows if thresholds is not None else softmax(rows),
                                            run.classifier.class_names, thresholds)}

    # the request model is built per app, so it is attached here rather than named in a (string) annotation
    predict.__annotations__["body"] = PredictRequest
    # exclude_unset: a single-label answer carries no label_sets or class_sets keys, not nulls
    app.post("/predict", response_model=PredictResponse, response_model_exclude_unset=True,
             responses={404: {"description": "the request names a model this server does not hold"}})(predict)
    return app


def serve(run: str | Path | list, settings: ServeConfig | None = None, verify: bool = True, log_level: str = "info",
          base: str | None = None, long_texts: str = "truncate") -> None:
    """Load the runs (each verified unless told not to; a folder of runs is every finished run in it) and serve
    them under `settings` until stopped: runs on one base share it (`classifier.load_many`)."""
    import uvicorn

    settings = settings or ServeConfig()
    t0 = time.perf_counter()
    host, port = settings.host, settings.port
    if settings.backend == "onnx":  # `export --onnx` folders on onnxruntime: torch is never imported
        from budgetlora.inference.onnx_serve import load_onnx

        if long_texts != "truncate":
            raise ConfigError("--long-texts chunk is served by the torch backend only")
        given = [run] if isinstance(run, (str, Path)) else run
        classifiers = [load_onnx(p) for p in dict.fromkeys(Path(p).resolve() for p in given)]  # each folder once
    else:
        from budgetlora.inference.classifier import load_many

        from budgetlora.hardware import trim_memory

        folders = run_folders([run] if isinstance(run, (str, Path)) else run)
        classifiers = load_many(folders, verify=verify, base=base, long_texts=long_texts)
    served = ServedRuns(classifiers)
    if settings.backend != "onnx":
        # what loading and verifying each run freed, handed back to the OS: without it a server of 10 runs holds
        # about 1.3x the memory of one, with it about 1.07x (benchmarks/serve_many.py)
        trim_memory()
    loaded = (str(served.default.classifier.path) if len(served.runs) == 1
              else f"{len(served.runs)} runs ({', '.join(r.name for r in served.runs)}) on "
                   f"{len({id(g) for g in served.groups})} models")
    logger.info(f"loaded {loaded} in {time.perf_counter() - t0:.1f}s; serving on http://{host}:{port} "
                f"(a page at /, docs at /docs)")
    for g in served.batching():
        logger.info(f"  {', '.join(g['models'])}: one base; " + ("requests mixed in one forward pass" if g["mixed"]
                    else f"one pass per run ({g['why_not']})"))
    # SIGTERM: uvicorn stops accepting, lets the requests in flight finish, stops the batcher, and then raises the
    # signal again under the handler in place before it started. This one turns that into a normal exit (status
    # 0): the stop was clean, and a supervisor should not read it as a crash.
    main = threading.current_thread() is threading.main_thread()  # only the main thread may set handlers
    previous = signal.signal(signal.SIGTERM, _exit_cleanly) if main else None
    try:
        uvicorn.run(create_app(served, settings), host=host, port=port, log_level=log_level)
    finally:
        if main:
            signal.signal(signal.SIGTERM, previous)


def _exit_cleanly(sig, frame) -> None:
    raise SystemExit(0)


