"""Unit discovery: what the VQ layers of a speech encoder learned.

* :mod:`s2i.analysis.words` — word detection by codes (ResDAVEnet-VQ's precision / recall / F1 of
  (code, word) pairs), and browsing the segments of one code;
* :mod:`s2i.analysis.abx` — ABX phone discrimination (ZeroSpeech / libri-light), within and across speakers;
* :mod:`s2i.analysis.bitrate` — the ZeroSpeech 2019 bitrate, per frame and with repeats merged;
* :mod:`s2i.analysis.units` — all of them for a checkpoint on a corpus split, as a report
  (``python -m s2i analyze units CHECKPOINT --split test``).
"""
from __future__ import annotations

import argparse

from s2i.analysis.abx import ABXResult, abx
from s2i.analysis.bitrate import Bitrate, bitrate
from s2i.analysis.words import (STOP_WORDS, CodeOccurrence, CodeWordTable, WordDetection, code_segments,
                                code_word_table, segments_for_code, word_detection)

__all__ = ["abx", "ABXResult", "bitrate", "Bitrate", "word_detection", "WordDetection", "code_word_table",
           "CodeWordTable", "code_segments", "segments_for_code", "CodeOccurrence", "STOP_WORDS"]

#: analysis -> one-line help
ANALYSES = {"units": "word detection, ABX and bitrate of a checkpoint's VQ layers on a corpus split"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``analyze`` takes an analysis name: ``python -m s2i analyze units CHECKPOINT ...``."""
    from s2i.analysis import units

    sub = parser.add_subparsers(dest="analysis", metavar="ANALYSIS", required=True)
    units.add_arguments(sub.add_parser("units", help=ANALYSES["units"], description=units.__doc__,
                                       formatter_class=argparse.RawDescriptionHelpFormatter))


def main(args: argparse.Namespace) -> int:
    from s2i.analysis import units

    if args.analysis == "units":
        return units.main(args)
    raise ValueError(f"unknown analysis {args.analysis!r}; choose one of {', '.join(ANALYSES)}")
