"""What every benchmark prints first: the machine it ran on.

    from common import machine, machine_line      # scripts in bench/ (run as python bench/x.py)
    print(machine_line())                         # one line for a log
    write_json(path, {"machine": machine(), ...})  # or the full dict in a JSON result

Figures from different machines, or from one machine under different load, are not comparable:
the dict says CPU model, cores (and how many this process may use), RAM, the load average at the
time, torch's intra-op threads, OMP_NUM_THREADS, library versions and the GPU, if any.
"""
from __future__ import annotations

import json
import os
import platform
from pathlib import Path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _ram_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def machine() -> dict:
    """The machine and software a measurement ran on, as a JSON-able dict."""
    import numpy as np
    import torch

    gpu = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        gpu = {"name": p.name, "count": torch.cuda.device_count(), "memory_gib": round(p.total_memory / 2**30, 1),
               "cuda": torch.version.cuda}
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "ram_gib": _ram_gib(),
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "torch_threads": torch.get_num_threads(),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "platform": platform.platform(),
        "gpu": gpu,
    }


def machine_line(m: dict | None = None) -> str:
    """``machine()`` as one human-readable line."""
    m = m or machine()
    gpu = f"{m['gpu']['count']}x {m['gpu']['name']}" if m["gpu"] else "no GPU"
    load = "/".join(f"{x:.1f}" for x in m["load_average"]) if m["load_average"] else "?"
    return (f"{m['cpu']}, {m['cores_usable']}/{m['cores']} cores, {m['ram_gib']} GiB RAM, load {load} (1/5/15 min), "
            f"torch {m['torch']} ({m['torch_threads']} threads, OMP_NUM_THREADS={m['OMP_NUM_THREADS'] or 'unset'}), "
            f"numpy {m['numpy']}, python {m['python']}, {gpu}")


def make_standin(folder: Path, layout: str = "umap") -> Path:
    """The small built-in corpus + an untrained rnn_vq_small, exported with a ``layout`` (umap or pca):
    a stand-in of the bundled model's size class for when no trained model exists."""
    import s2i
    from s2i.cli import main as cli
    from s2i.config import preset
    from s2i.datasets import synthetic
    from s2i.datasets.corpus import read_split
    from s2i.encoders.text import Tokenizer

    corpus = synthetic.generate(folder / "corpus", size="small")
    cfg, _ = preset("rnn_vq_small")
    texts = [r["text"] for r in read_split(corpus, "train")]
    cfg.text.vocab = list(Tokenizer.from_texts(texts, level=cfg.text.arch).vocab)
    ckpt = s2i.save(s2i.build_model(cfg).eval(), folder / "ckpt")
    if cli(["export", str(ckpt), "--data", str(corpus), "--split", "test", "--layout", layout]) != 0:
        raise SystemExit("export of the stand-in failed")
    return ckpt


def write_json(path: str | Path, result: dict) -> None:
    """Write a benchmark's JSON result (``--json PATH``), making its folder if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    print(machine_line())
