"""Benchmark the app as a user meets it: cold start, query latency, memory.

    python bench/app.py                          # checkpoints/default and its gallery
    python bench/app.py --checkpoint runs/x/best --queries 50 --json

* cold start: ``python app.py`` in a fresh process until ``GET /`` answers 200 (target <= 10 s);
* latency: a 5 s spoken query sent through ``gradio_client`` to ``/search_speech`` (upload, decode,
  embed, search, spectrogram, response), p50 / p95 over ``--queries`` runs after one warm-up
  (target p50 <= 300 ms): until the answer arrives (as a browser, which then fetches the images in
  parallel), and until the client has also downloaded every returned file, one after another;
* memory: the server's resident set size after the queries (and its peak).

Without a checkpoint that has an exported gallery, ``--standin`` builds one: the small built-in corpus
and an untrained ``rnn_vq_small`` (the timings of a trained model of that preset are the same).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from common import machine, machine_line, make_standin  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MB."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def five_second_query(gallery_dir: Path, out: Path, seconds: float = 5.0) -> Path:
    """Captions of gallery images spoken by a voice of their own, joined and cut to ``seconds``."""
    import soundfile

    from s2i.audio import to_mono_16k
    from s2i.datasets.speech_synthesis import synthesize
    from s2i.gallery import Gallery

    g = Gallery.load(gallery_dir)
    pieces, total, j = [], 0, 0
    while total < seconds * 16000:
        utt = synthesize(g.captions[j % g.num_captions]["text"], voice="en-gb-scotland", variant="benjamin")
        wave = to_mono_16k(utt.audio, utt.sample_rate).numpy()
        pieces += [wave, np.zeros(3200, np.float32)]
        total += len(wave) + 3200
        j += 1
    wave = np.concatenate(pieces)[: int(seconds * 16000)]
    soundfile.write(out, wave, 16000, subtype="PCM_16")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", default="default")
    parser.add_argument("--gallery", default=None)
    parser.add_argument("--queries", type=int, default=30)
    parser.add_argument("--standin", action="store_true",
                        help="build an untrained stand-in if the checkpoint is missing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)
    load = machine()  # before anything of ours runs
    from gradio_client import Client, handle_file

    from s2i.gallery import find_gallery

    work = Path(tempfile.mkdtemp(prefix="s2i-bench-app-"))
    ckpt = Path(args.checkpoint) if Path(args.checkpoint).is_dir() else ROOT / "checkpoints" / args.checkpoint
    gallery = Path(args.gallery) if args.gallery else ckpt
    if find_gallery(gallery) is None:
        if not args.standin:
            print(f"{gallery} has no exported gallery; export one, or pass --standin", file=sys.stderr)
            return 2
        ckpt = gallery = make_standin(work)
    query = five_second_query(gallery, work / "query.wav")

    port = free_port()
    cmd = [sys.executable, str(ROOT / "app.py"), "--checkpoint", str(ckpt), "--gallery", str(gallery),
           "--port", str(port)]
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1", MPLBACKEND="Agg")
    started = time.perf_counter()
    server = subprocess.Popen(cmd, cwd=str(ROOT), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/"
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the app exited with {server.returncode}")
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        cold = time.perf_counter() - started
        rss_start = rss_mb(server.pid)[0]
        times = {}
        for name, download in (("response", False), ("with_downloads", str(work / "downloads"))):
            client = Client(url, verbose=False, analytics_enabled=False, download_files=download)
            client.predict(handle_file(str(query)), 5, api_name="/search_speech")  # warm-up
            times[name] = []
            for _ in range(args.queries):
                t = time.perf_counter()
                client.predict(handle_file(str(query)), 5, api_name="/search_speech")
                times[name].append(1000 * (time.perf_counter() - t))
        rss, peak = rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    result = {"machine": load, "checkpoint": str(ckpt), "cold_start_s": round(cold, 2),
              "query_seconds": 5.0, "queries": args.queries,
              "latency_ms": {name: {"p50": round(float(np.percentile(t, 50)), 1),
                                    "p95": round(float(np.percentile(t, 95)), 1),
                                    "min": round(min(t), 1), "max": round(max(t), 1)} for name, t in times.items()},
              "rss_mb": {"after_start": round(rss_start), "after_queries": round(rss), "peak": round(peak)}}
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"machine (before the run): {machine_line(result['machine'])}")
        print(f"checkpoint: {ckpt}")
        print(f"cold start to first page: {result['cold_start_s']:.2f} s (target <= 10 s)")
        for name, what in (("response", "until the answer (file URLs) arrives"),
                           ("with_downloads", "and the client has downloaded the 5 images + spectrogram")):
            lat = result["latency_ms"][name]
            print(f"5 s spoken query through gradio_client, {what}, {args.queries} runs: p50 {lat['p50']:.0f} ms, "
                  f"p95 {lat['p95']:.0f} ms (min {lat['min']:.0f}, max {lat['max']:.0f}; target p50 <= 300 ms)")
        r = result["rss_mb"]
        print(f"server memory: {r['after_start']} MB after start, {r['after_queries']} MB after the queries, "
              f"peak {r['peak']} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
