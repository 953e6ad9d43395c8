"""``python -m s2i``: one entry point, one subcommand per concept.

Each subcommand lives in the module that owns the concept; that module provides
``add_arguments(parser)`` and ``main(args) -> int``. Modules are imported only when their subcommand
runs, so ``--help`` is instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("s2i.datasets.prepare", "make the built-in corpus or prepare Flickr8k / Places / SpokenCOCO"),
    "train": ("s2i.train", "train a model from a preset or config with key=value overrides"),
    "evaluate": ("s2i.evaluate", "recall@k and ranks of a checkpoint on a split"),
    "embed": ("s2i.embed", "embed audio, images or text with a checkpoint and save the vectors"),
    "search": ("s2i.search", "query a gallery of images or captions with speech, text or an image"),
    "export": ("s2i.export", "package a checkpoint with its gallery, index and UMAP layout for the app"),
    "analyze": ("s2i.analysis", "what the VQ units learned: word detection, ABX, bitrate"),
}


def _load(name: str):
    module_name, _ = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and module_name.startswith(exc.name):
            return None
        raise
    if not (hasattr(module, "add_arguments") and hasattr(module, "main")):
        return None
    return module


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Only the chosen subcommand's module is imported.
    chosen = next((a for a in argv if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="python -m s2i", description="s2i: visually grounded speech toolkit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = _load(name) if name == chosen else None
        if module is not None:
            module.add_arguments(p)
        p.set_defaults(_module=module, _name=name)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args._module is None:
        print(f"s2i {args._name}: not built yet", file=sys.stderr)
        return 2
    try:
        return int(args._module.main(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, PermissionError) as exc:
        # Errors s2i raises on bad input carry a readable message; no traceback for them.
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"s2i {args._name}: error: {message}", file=sys.stderr)
        return 1
