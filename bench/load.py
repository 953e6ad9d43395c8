"""Load test of the app: many gradio_client users at once, a bounded number of spoken queries.

    python bench/load.py --standin                       # an untrained small model on the built-in corpus
    python bench/load.py --checkpoint runs/x/best        # a checkpoint with an exported gallery
    python bench/load.py --url http://127.0.0.1:7860/ --audio q.wav     # an app already running
    python bench/load.py --standin --users 50 --queries 100 --json

Each user is its own ``gradio_client.Client`` (its own session) in its own thread; the users
connect, then all start together and share ``--queries`` calls of ``/search_speech``. Reported: how many were
answered (the goal is all of them), latency p50 / p95 / max from submit to answer (queue wait
included), wall time and throughput, and the app's limits (queue size, concurrency, upload size,
time limits) read from the in-process app, with a warning for each limit that is missing.

``--checkpoint`` and ``--standin`` launch the app in this process on 127.0.0.1 at a free port with
``app.launch`` (the app's own settings). The clients then share this process (and its GIL) with the
server, which inflates latencies on a small machine; ``--url`` keeps them apart (tests/test_load.py
launches the app in the test process and runs this script with ``--url``).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def drive(url: str, audio: str, users: int = 50, queries: int = 100, k: int = 5, api_name: str = "/search_speech",
          timeout: float = 600.0) -> dict[str, Any]:
    """``users`` concurrent clients send ``queries`` spoken queries in all; returns counts and latencies (ms)."""
    from gradio_client import Client, handle_file

    latencies: list[float] = []
    errors: list[str] = []
    connect: list[float] = []
    lock = threading.Lock()
    began: list[float] = []
    start = threading.Barrier(users, action=lambda: began.append(time.perf_counter()))  # queries start together
    share = [queries // users + (1 if u < queries % users else 0) for u in range(users)]

    def user(u: int) -> None:
        try:
            t = time.perf_counter()
            client = Client(url, verbose=False, analytics_enabled=False, download_files=False, max_workers=2,
                            httpx_kwargs={"timeout": timeout})
            with lock:
                connect.append(1000 * (time.perf_counter() - t))
        except Exception as exc:  # noqa: BLE001 - a user that cannot connect is a result
            with lock:
                errors.extend([f"connect: {type(exc).__name__}: {exc}"] * share[u])
            start.abort()
            return
        try:
            start.wait(timeout)
        except threading.BrokenBarrierError:
            pass
        for _ in range(share[u]):
            t = time.perf_counter()
            try:
                items = client.predict(handle_file(audio), k, api_name=api_name)[0]
                if len(items) != k:
                    raise RuntimeError(f"{len(items)} results instead of {k}")
            except Exception as exc:  # noqa: BLE001
                with lock:
                    errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
                continue
            with lock:
                latencies.append(1000 * (time.perf_counter() - t))

    threads = [threading.Thread(target=user, args=(u,), daemon=True) for u in range(users)]
    t0 = time.perf_counter()
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout)
    wall = time.perf_counter() - (began[0] if began else t0)  # the query phase

    def pct(xs: list[float], q: float) -> float | None:
        return round(float(np.percentile(xs, q)), 1) if xs else None

    return {"users": users, "queries": queries, "answered": len(latencies), "errors": len(errors),
            "error_examples": sorted(set(errors))[:5], "wall_s": round(wall, 2),
            "throughput_qps": round(len(latencies) / wall, 2) if wall > 0 else None,
            "latency_ms": {"p50": pct(latencies, 50), "p95": pct(latencies, 95), "max": pct(latencies, 100)},
            "connect_ms": {"p50": pct(connect, 50), "p95": pct(connect, 95)}}


def limits(demo) -> dict[str, Any]:
    """The limits a launched ``gr.Blocks`` enforces under load, and which are missing."""
    queue = getattr(demo, "_queue", None)
    default = getattr(queue, "default_concurrency_limit", None)
    events = {}
    for fn in demo.fns.values():
        if fn.fn is None or fn.api_visibility == "private" or not fn.api_name:
            continue
        limit = default if fn.concurrency_limit == "default" else fn.concurrency_limit
        events[str(fn.api_name)] = {"concurrency_limit": limit, "concurrency_id": fn.concurrency_id,
                                    "time_limit": fn.time_limit}
    out = {"queue_max_size": getattr(queue, "max_size", None),
           "default_concurrency_limit": default,
           "max_file_size_bytes": getattr(demo, "max_file_size", None),
           "max_threads": getattr(demo, "max_threads", None), "events": events}
    missing = []
    if out["queue_max_size"] is None:
        missing.append("queue max_size (demo.queue(max_size=...)): without it the queue grows without bound")
    if out["max_file_size_bytes"] is None:
        missing.append("upload size limit (launch(max_file_size=...))")
    unlimited = sorted(n for n, e in events.items() if e["concurrency_limit"] is None)
    if unlimited:
        missing.append(f"events with no concurrency limit: {unlimited}")
    timeless = sorted(n for n, e in events.items() if e["time_limit"] is None and e["concurrency_id"] == "model")
    if timeless:
        missing.append(f"model events with no time_limit (a slow call holds a worker as long as it runs): {timeless}")
    out["missing"] = missing
    return out


def a_query(gallery_dir: Path, out: Path, seconds: float = 3.0) -> Path:
    """A gallery caption's audio (or the first ``seconds`` of it), as a WAV file to upload."""
    import soundfile

    from s2i.audio import load_audio
    from s2i.gallery import Gallery

    g = Gallery.load(gallery_dir)
    path = next((g.audio_path(j) for j in range(g.num_captions) if g.audio_path(j)), None)
    if path is None:
        raise SystemExit(f"the gallery in {gallery_dir} has no caption audio; pass --audio")
    soundfile.write(out, load_audio(path, max_seconds=seconds).numpy(), 16000, subtype="PCM_16")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="drive an app that is already running")
    where.add_argument("--checkpoint", default=None, help="launch the app on this checkpoint (default: 'default')")
    where.add_argument("--standin", action="store_true", help="launch the app on an untrained small stand-in")
    parser.add_argument("--audio", help="the query file (default: a caption of the gallery)")
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--queries", type=int, default=100, help="queries in all, shared by the users")
    parser.add_argument("--k", type=int, default=5, help="results per query")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="s2i-bench-load-"))
    demo = None
    if args.url:
        url, audio = args.url, args.audio
        if not audio:
            raise SystemExit("--url needs --audio")
    else:
        sys.path.insert(0, str(ROOT))
        import app as s2i_app  # the top-level app.py, before bench/ joins the path (bench/app.py)

        sys.path.append(str(ROOT / "bench"))
        from common import make_standin

        ckpt = make_standin(work, layout="pca") if args.standin else (args.checkpoint or "default")
        demo = s2i_app.build_demo(str(ckpt))
        if demo.s2i_loaded().gallery is None:
            raise SystemExit(f"no gallery loaded: {demo.s2i_loaded().describe()}")
        port = free_port()
        s2i_app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
        url = f"http://127.0.0.1:{port}/"
        audio = args.audio or str(a_query(demo.s2i_loaded().gallery.root, work / "query.wav"))
    try:
        result = drive(url, audio, args.users, args.queries, k=args.k)
        if demo is not None:
            result["limits"] = limits(demo)
    finally:
        if demo is not None:
            demo.close()
        shutil.rmtree(work, ignore_errors=True)
    result["load_average"] = [round(x, 1) for x in os.getloadavg()]
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        lat = result["latency_ms"]
        print(f"{result['users']} users, {result['queries']} queries: {result['answered']} answered, "
              f"{result['errors']} errors in {result['wall_s']} s ({result['throughput_qps']} queries/s); "
              f"latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, max {lat['max']} ms; "
              f"load average {result['load_average']}")
        for e in result["error_examples"]:
            print("  error:", e)
        for m in result.get("limits", {}).get("missing", []):
            print("  missing limit:", m)
    return 0 if result["answered"] == result["queries"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
