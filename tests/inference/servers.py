"""A FastAPI app served for real, on a free loopback port in a background thread: what a browser or a client
process needs to reach."""
from __future__ import annotations

import contextlib
import threading
import time

import uvicorn


@contextlib.contextmanager
def uvicorn_thread(app):
    """Serve `app` until the block ends; yields its base url."""
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not srv.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{srv.servers[0].sockets[0].getsockname()[1]}"
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
