"""The app under load: 50 concurrent gradio_client users against the served app on loopback.

    bash scripts/test.sh -m slow tests/test_load.py -s      # prints p50 / p95 and the app's limits

The fast test checks that the limits that keep a public app alive are configured (queue size,
per-event concurrency, upload size); the slow one drives 50 users x 2 spoken queries through
``bench/load.py``'s :func:`drive` and requires every query answered.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
USERS, QUERIES = 50, 100


def bench_load():
    spec = importlib.util.spec_from_file_location("bench_load", REPO / "bench" / "load.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_queue_concurrency_and_upload_limits_are_configured(served_app):
    limits = bench_load().limits(served_app.demo)
    print("app limits:", limits)
    # a bounded queue that holds a burst of USERS waiting queries (more are refused, not queued forever)
    assert limits["queue_max_size"] is not None and USERS <= limits["queue_max_size"] <= 1000
    # every public event runs at most a few at a time; the model's events share one small pool
    events = limits["events"]
    assert all(e["concurrency_limit"] is not None and e["concurrency_limit"] <= 8 for e in events.values()), events
    model = {name for name, e in events.items() if e["concurrency_id"] == "model"}
    assert {"search_speech", "search_text", "units_audio", "matchmap", "evaluate"} <= model
    assert all(events[n]["concurrency_limit"] <= 4 for n in model)
    # uploads are capped (the app's MAX_UPLOAD, 25 MB)
    assert limits["max_file_size_bytes"] is not None and limits["max_file_size_bytes"] <= 50 * 2**20


@pytest.mark.slow
def test_fifty_concurrent_users_are_all_answered(served_app, tmp_path):
    import soundfile

    from s2i.audio import load_audio

    wav = tmp_path / "query.wav"
    soundfile.write(wav, load_audio(served_app.corpus / "audio" / "utt000_0.wav").numpy(), 16000, subtype="PCM_16")
    # the users run in their own process (their threads would otherwise share this one's GIL with the server)
    done = subprocess.run([sys.executable, str(REPO / "bench" / "load.py"), "--url", served_app.url, "--audio", str(wav),
                           "--users", str(USERS), "--queries", str(QUERIES), "--k", "3", "--json"],
                          capture_output=True, text=True, timeout=900, cwd=REPO)
    result = json.loads(done.stdout[done.stdout.index("{"):])
    lat = result["latency_ms"]
    print(f"\nload: {USERS} users, {QUERIES} queries of /search_speech: {result['answered']} answered, "
          f"{result['errors']} errors, wall {result['wall_s']} s, {result['throughput_qps']} q/s, "
          f"latency p50 {lat['p50']} ms, p95 {lat['p95']} ms, max {lat['max']} ms; "
          f"connect p95 {result['connect_ms']['p95']} ms; load average {result['load_average']}")
    assert result["answered"] == QUERIES, (result["error_examples"], done.stderr[-2000:])
    assert done.returncode == 0
    # and the server still answers a single user right after the burst
    items, *_ = served_app.client().predict(0, api_name="/browse")
    assert items
