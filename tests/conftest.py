"""Shared fixtures: a served app on loopback (a small untrained model + an exported gallery of a corpus
the tests synthesise) and a recorder of the files a piece of code opens, writes or removes.

Both are used by the reliability and security tests (tests/test_bad_inputs.py, test_load.py,
test_security.py); other test files keep their own fixtures.
"""
from __future__ import annotations

import contextlib
import os
import re
import socket
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------------------------------
# which files code touches (Python-level opens: the builtin open, os.open, renames, removals)
# ---------------------------------------------------------------------------------------------
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_CHANGES = {"os.remove", "os.rmdir", "os.mkdir", "os.rename", "os.replace", "os.truncate", "shutil.rmtree",
            "shutil.move", "shutil.copyfile", "os.symlink", "os.link", "os.chmod"}


@dataclass
class FileAudit:
    """Records, while active, every file Python code in this process reads or changes.

    A ``sys.addaudithook`` hook cannot be removed, so one is installed for the session and does
    nothing outside :meth:`recording`. Files opened by C libraries themselves (libsndfile,
    safetensors' Rust reader) raise no audit event; their callers' ``os.path`` checks do not either.
    """

    active: bool = False
    reads: list[Path] = field(default_factory=list)
    writes: list[Path] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hook(self, event: str, args: tuple) -> None:
        if not self.active:
            return
        if event == "open":
            path, mode, flags = args
            if not isinstance(path, (str, bytes, os.PathLike)):
                return  # a file descriptor
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or bool((flags or 0) & _WRITE_FLAGS)
            self._add(self.writes if writing else self.reads, path)
        elif event in _CHANGES:
            for path in args[:2] if event in ("os.rename", "os.replace", "shutil.move", "shutil.copyfile") else args[:1]:
                if isinstance(path, (str, bytes, os.PathLike)):
                    self._add(self.writes, path)

    def _add(self, where: list[Path], path) -> None:
        path = os.fsdecode(path)
        with self._lock:
            where.append(Path(os.path.abspath(path)))

    @contextlib.contextmanager
    def recording(self):
        with self._lock:
            self.reads.clear()
            self.writes.clear()
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    @staticmethod
    def outside(paths: list[Path], roots: list[Path], patterns: list[str] = ()) -> list[Path]:
        """The paths neither under one of ``roots`` (symlinks resolved) nor matching a regex of ``patterns``."""
        roots = [Path(os.path.realpath(r)) for r in roots]
        out = []
        for p in paths:
            real = Path(os.path.realpath(p))
            if not any(real == r or r in real.parents for r in roots) and not any(
                    re.search(pat, str(p)) or re.search(pat, str(real)) for pat in patterns):
                out.append(p)
        return sorted(set(out))


_AUDIT = FileAudit()
_HOOKED = []


@pytest.fixture
def file_audit() -> FileAudit:
    if not _HOOKED:  # installed on first use, so test sessions that never ask pay nothing
        sys.addaudithook(_AUDIT.hook)
        _HOOKED.append(True)
    return _AUDIT


def system_read_roots() -> list[Path]:
    """Where reading is never a problem: the code (repo package, interpreter, libraries) and the OS's
    own files. The repo's data/, runs/ and checkpoints/ are deliberately not here."""
    roots = [REPO / "s2i", REPO / "app.py", REPO / "tests", REPO / ".venv", Path(sys.prefix), Path(sys.base_prefix),
             Path("/usr"), Path("/lib"), Path("/lib64"), Path("/proc"), Path("/sys"), Path("/dev")]
    roots += [Path(p) for p in sys.path if p and Path(p).is_dir() and p not in ("", str(REPO))]
    with contextlib.suppress(Exception):
        import matplotlib

        roots.append(Path(matplotlib.get_cachedir()))
    return [r for r in roots if r != REPO]


# ---------------------------------------------------------------------------------------------
# the app, served on loopback
# ---------------------------------------------------------------------------------------------
@dataclass
class ServedApp:
    root: Path  # everything the fixture made lives under it
    corpus: Path
    ckpt: Path  # an exported checkpoint folder (model + gallery), under the app's runs folder
    demo: object
    url: str

    def client(self, download: bool = False):
        """A gradio_client for the app; ``download``: fetch the files endpoints return (else their
        server paths are returned as they are)."""
        from gradio_client import Client

        downloads = self.root / "downloads"
        downloads.mkdir(exist_ok=True)
        return Client(self.url, verbose=False, analytics_enabled=False,
                      download_files=str(downloads) if download else False)

    def write_roots(self) -> list[Path]:
        """Where serving a request may write: this fixture's folder, Gradio's upload/cache folder, the
        app's thumbnail folder."""
        from gradio.utils import get_upload_folder

        loaded = self.demo.s2i_loaded()
        roots = [self.root, Path(get_upload_folder())]
        if loaded.thumbs_dir is not None:
            roots.append(Path(loaded.thumbs_dir))
        return roots


@pytest.fixture(scope="session")
def served_app(tmp_path_factory) -> ServedApp:
    """A small untrained rnn_vq_small with an exported gallery (4 shapes, 2 spoken captions each), served
    on 127.0.0.1 at a free port with the app's own launch settings (upload limit, allowed paths)."""
    pytest.importorskip("gradio_client")
    import app as s2i_app
    from s2i.cli import main as cli
    from tests.test_export import make_checkpoint, make_corpus

    root = tmp_path_factory.mktemp("served_app")
    corpus = make_corpus(root / "data" / "shapes", n_images=4, captions_per_image=2, splits=("train", "val", "test"))
    ckpt = make_checkpoint(root / "runs" / "fixture" / "best", corpus)  # under runs/: a folder the app may load
    assert cli(["export", str(ckpt), "--data", str(corpus), "--layout", "pca", "--max-clips", "2"]) == 0
    demo = s2i_app.build_demo(str(ckpt), runs_root=root / "runs", data_root=root / "data", export_layout="pca")
    port = free_port()
    s2i_app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    yield ServedApp(root, corpus, ckpt, demo, f"http://127.0.0.1:{port}/")
    demo.s2i_trainer.stop()
    demo.close()
