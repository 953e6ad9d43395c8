"""Time to validation R@10 >= a threshold, read from training runs' metrics.jsonl.

    python bench/time_to_recall.py runs/default_novq runs/default runs/seed_rnn_small
    python bench/time_to_recall.py runs/* --threshold 0.9 --json runs/bench/time_to_recall.json

Training writes one validation line per epoch with ``elapsed_s``, the run's training wall time so far
(validation included, kept across ``--resume``). This prints, per run, every validation with its time
and R@10 in both directions, and the first time both reach the threshold. The times are those of the
machine and load the runs had, not of the machine this script runs on.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from common import write_json  # bench/common.py: this script's folder is on sys.path


def validations(run: Path) -> list[dict]:
    """The validation lines of a run's metrics.jsonl, in order."""
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip())
    return [r for r in lines if "val" in r]


def first_reaching(vals: list[dict], threshold: float) -> dict | None:
    """The first validation where speech->image and image->speech R@10 are both >= ``threshold``."""
    return next((r for r in vals if min(r["val"]["speech_to_image"]["R@10"],
                                        r["val"]["image_to_speech"]["R@10"]) >= threshold), None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (out_dir of python -m s2i train)")
    parser.add_argument("--threshold", type=float, default=0.9)
    parser.add_argument("--json", type=Path, help="also write the result here")
    args = parser.parse_args()

    result = {}
    print(f"| run | validation after | training time (`elapsed_s`) | R@10 speech→image | R@10 image→speech | "
          f"first reaching R@10 ≥ {args.threshold} both ways |")
    print("|---|---|---|---|---|---|")
    for run in args.runs:
        vals = validations(run)
        first = first_reaching(vals, args.threshold)
        result[str(run)] = {"validations": [{"epoch": r["epoch"], "elapsed_s": r.get("elapsed_s"),
                                             "R@10_speech_to_image": r["val"]["speech_to_image"]["R@10"],
                                             "R@10_image_to_speech": r["val"]["image_to_speech"]["R@10"]} for r in vals],
                            "reached_at_s": first.get("elapsed_s") if first else None}
        if not vals:
            print(f"| {run} | no validation line | | | | not reached |")
        for r in vals:
            minutes = f"{r['elapsed_s'] / 60:.1f} min" if "elapsed_s" in r else "not logged"
            mark = f"**{minutes}**" if r is first else ("not reached" if first is None and r is vals[-1] else "")
            print(f"| {run} | epoch {r['epoch']} | {minutes} | {r['val']['speech_to_image']['R@10']:.3f} | "
                  f"{r['val']['image_to_speech']['R@10']:.3f} | {mark} |")
    if args.json:
        write_json(args.json, {"threshold": args.threshold, "runs": result})


if __name__ == "__main__":
    main()
