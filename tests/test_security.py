"""Untrusted files and untrusted visitors.

* Checkpoints, training states, galleries, indexes and backbone weights load through safetensors +
  JSON only: a pickle is refused with a message, and a pickle whose ``__reduce__`` would run a shell
  command never runs (a live control shows the same payload does run when unpickled).
* The library's source never unpickles, never ``yaml.load``s, never hands a string to a shell.
* Config values are validated (types, unknown keys, ranges, YAML tags never constructed).
* The app's Training tab validates its inputs (choices, numbers, no path escapes), and what reaches
  ``subprocess`` is an argument list, never a shell string.
* Gradio serves files only from the app's allowed paths: no ``/etc/passwd``, no traversal, no
  symlink out, no repo sources, checked with HTTP GETs on the running app.
"""
from __future__ import annotations

import os
import pickle
import re
import shutil
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import s2i
from s2i import checkpoint
from s2i.config import ConfigError, ModelConfig, TrainConfig, apply_overrides, from_dict

REPO = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs ``touch MARKER`` in a shell."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def payload_bytes(marker: Path) -> bytes:
    return pickle.dumps({"state_dict": {"weight": Payload(marker)}})


def test_the_payload_is_live(tmp_path):
    """Control: unpickling the payload does run the command (so 'no marker' below means 'never unpickled')."""
    marker = tmp_path / "marker"
    pickle.loads(payload_bytes(marker))
    assert marker.exists()


# ---------------------------------------------------------------------------------------------
# pickles are refused everywhere
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def model_dir(tmp_path) -> Path:
    from tests.test_train import tiny_model

    return s2i.save(s2i.build_model(tiny_model()), tmp_path / "model")


@pytest.mark.parametrize("where", ["model.pt", "model.pth", "model.ckpt", "model.bin", "pytorch_model.bin",
                                   "model.safetensors (a pickle inside)", "path to model.pt"])
def test_model_pickles_are_refused_and_never_unpickled(where, model_dir, tmp_path):
    marker = tmp_path / "marker"
    name = where.split(" ")[0] if not where.startswith("path") else "model.pt"
    (model_dir / "model.safetensors").unlink()
    torch.save({"weight": Payload(marker)}, model_dir / name)  # the zip format torch.save writes
    target = model_dir / name if where.startswith("path") else model_dir
    with pytest.raises(s2i.model.CheckpointError, match="pickle|truncated or corrupt") as err:
        s2i.load(target)
    assert "pickle" in str(err.value) or name == "model.safetensors"
    assert not marker.exists()


def test_training_state_pickle_is_refused_and_never_unpickled(model_dir, tmp_path):
    marker = tmp_path / "marker"
    last = tmp_path / "run" / "last"
    shutil.copytree(model_dir, last)
    (last / checkpoint.STATE_JSON).write_text('{"format": "s2i-training-state", "version": 1, "state": {}}')
    (last / checkpoint.STATE_TENSORS).write_bytes(payload_bytes(marker))
    with pytest.raises(ValueError, match="training_state|corrupt"):
        checkpoint.load(last)
    assert not marker.exists()


def test_backbone_weights_pickle_never_runs(tmp_path):
    """A user-supplied .pth for the ResNet backbone is read with torch.load(weights_only=True)."""
    from s2i.encoders.image import read_state_dict

    marker = tmp_path / "marker"
    torch.save({"conv1.weight": Payload(marker)}, tmp_path / "resnet50.pth")
    with pytest.raises(ConfigError, match="plain state dict"):
        read_state_dict(tmp_path / "resnet50.pth")
    assert not marker.exists()
    (tmp_path / "resnet50.safetensors").write_bytes(payload_bytes(marker))
    with pytest.raises(ConfigError, match="truncated or corrupt"):
        read_state_dict(tmp_path / "resnet50.safetensors")
    assert not marker.exists()


def test_gallery_and_index_pickles_never_run(served_app, tmp_path):
    from s2i.gallery import Gallery, GalleryError
    from s2i.search import Index, SearchError

    marker = tmp_path / "marker"
    gallery = shutil.copytree(served_app.ckpt, tmp_path / "gallery")
    (gallery / "gallery.safetensors").write_bytes(payload_bytes(marker))
    problems = []
    try:
        Gallery.load(gallery)
        problems.append("Gallery.load accepted a pickle")
    except GalleryError:
        pass
    except Exception as exc:  # noqa: BLE001
        problems.append(f"s2i/gallery.py Gallery.load: {type(exc).__name__} escapes for a corrupt gallery.safetensors "
                        "(wrap load_file's SafetensorError in GalleryError; app.Loaded.open catches GalleryError only)")
    index_dir = tmp_path / "index"
    Index(torch.nn.functional.normalize(torch.randn(20, 8), dim=1), [str(i) for i in range(20)]).save(index_dir)
    vectors = next(p for p in index_dir.iterdir() if p.suffix == ".safetensors")
    vectors.write_bytes(payload_bytes(marker))
    try:
        Index.load(index_dir)
        problems.append("Index.load accepted a pickle")
    except SearchError:
        pass
    except Exception as exc:  # noqa: BLE001
        problems.append(f"s2i/search.py Index.load: {type(exc).__name__} escapes for a corrupt vectors file "
                        "(wrap load_file's SafetensorError in SearchError)")
    assert not marker.exists()
    assert not problems, "; ".join(problems)


#: patterns that would unpickle, construct YAML objects, or run a shell, in the library and the app
DANGEROUS = {
    r"\bpickle\.loads?\(": "unpickling",
    r"\btorch\.load\((?![^)]*weights_only=True)": "torch.load without weights_only=True",
    r"\byaml\.(?:load|unsafe_load|full_load)\(": "yaml.load (constructs Python objects): use yaml.safe_load",
    r"allow_pickle\s*=\s*True": "numpy allow_pickle=True",
    r"shell\s*=\s*True": "a shell",
    r"\bos\.(?:system|popen)\(": "a shell",
    r"(?<![.\w])eval\(|(?<![.\w])exec\(": "eval/exec",
    r"\bmarshal\.loads?\(|\bshelve\.open\(|\bdill\.|\bjoblib\.load\(": "another unpickler",
}


def test_the_source_never_unpickles_or_uses_a_shell():
    files = sorted((REPO / "s2i").rglob("*.py")) + [REPO / "app.py"]
    found = []
    for path in files:
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#", 1)[0]
            for pattern, what in DANGEROUS.items():
                if re.search(pattern, code) and "st.save_file(torch.load(" not in code:  # (a message's hint)
                    found.append(f"{path.relative_to(REPO)}:{n}: {what}: {line.strip()}")
    assert not found, "\n".join(found)


# ---------------------------------------------------------------------------------------------
# config values
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("epochs=-1", "epochs: must be at least 1"), ("batch_size=1", "batch_size: must be at least 2"),
    ("lr=0", "lr: must be above 0"), ("lr=nan", "lr: expected a finite number"), ("lr=inf", "finite"),
    ("margin=-0.5", "margin: must be at least 0"), ("workers=-2", "workers"), ("log_every=0", "log_every"),
    ("epochs=2.5", "epochs: expected an integer"), ("bucket=maybe", "bucket: expected true/false"),
    ("out_dirr=x", "unknown key 'out_dirr'"), ("epochs", "not of the form key=value"),
])
def test_training_config_values_are_validated(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        apply_overrides(TrainConfig(), [override])


def test_model_config_from_json_is_validated():
    for bad, message in (({"speech": {"hidden_size": "big"}}, "speech.hidden_size: expected an integer"),
                         ({"speech": {"vq_sizes": "[1, 2"}}, "speech.vq_sizes"),
                         ({"image": {"arch": 3}}, "image.arch: expected a string"),
                         ({"text": {"vocab": "abc"}}, "text.vocab: expected a list"),
                         ({"__class__": "x"}, "unknown key")):
        with pytest.raises(ConfigError, match=re.escape(message)):
            from_dict(ModelConfig, bad, "model")


def test_yaml_tags_are_never_constructed(tmp_path):
    from s2i.train import build_configs

    marker = tmp_path / "marker"
    config = tmp_path / "evil.yaml"
    config.write_text(f"epochs: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(Exception) as err:  # noqa: PT011 - the type is the training engineer's (see below)
        build_configs(str(config), [])
    assert not marker.exists()
    with pytest.raises(ConfigError, match="vq_sizes"):  # list overrides go through yaml.safe_load too
        build_configs("rnn_small", [f"model.speech.vq_sizes=!!python/object/apply:os.system ['touch {marker}']"])
    assert not marker.exists()
    assert isinstance(err.value, ConfigError)


# ---------------------------------------------------------------------------------------------
# the app's Training tab
# ---------------------------------------------------------------------------------------------
ESCAPES = ["../../etc", "/etc", "shapes/../../..", "~root", "shapes; touch MARKER", "$(touch MARKER)",
           "`touch MARKER`", "shapes && touch MARKER", "shapes | touch MARKER", "shapes\ntouch MARKER"]


def test_training_tab_refuses_escapes_and_metacharacters(served_app, tmp_path):
    from gradio_client.exceptions import AppError

    client = served_app.client()
    marker = tmp_path / "marker"
    trainer = served_app.demo.s2i_trainer
    sent = 0
    for bad in ESCAPES[::2]:  # (through the API: half of them, each ~0.5 s; all of them below)
        bad = bad.replace("MARKER", str(marker))
        for args in ((bad, "shapes", 1, "cpu"), ("rnn_vq_small", bad, 1, "cpu"), ("rnn_vq_small", "shapes", 1, bad)):
            with pytest.raises(AppError, match="not in the list of choices"):
                client.predict(*args, api_name="/train_start")
            sent += 1
        with pytest.raises(AppError):  # epochs is a number
            client.predict("rnn_vq_small", "shapes", bad, "cpu", api_name="/train_start")
        with pytest.raises(AppError, match="not a checkpoint folder"):
            client.predict(bad, api_name="/load_checkpoint")
        sent += 2
    # the trainer checks again for callers that bypass the dropdowns
    import gradio as gr

    for bad in ESCAPES:
        for args in ((bad, "shapes", 1, "cpu"), ("rnn_vq_small", bad, 1, "cpu"), ("rnn_vq_small", "shapes", bad, "cpu"),
                     ("rnn_vq_small", "shapes", 1, bad)):
            with pytest.raises(gr.Error):
                trainer.command(*args)
    assert not trainer.running() and not marker.exists()
    print(f"training tab: {sent} hostile requests refused")


def test_what_reaches_subprocess_is_an_argument_list(tmp_path, monkeypatch):
    """A corpus folder whose *name* holds shell metacharacters is a valid choice: it must reach the
    training process as one argument, never through a shell."""
    import json

    import app as s2i_app

    data = tmp_path / "data"
    weird = data / "c; touch pwned $(touch pwned) `touch pwned` && rm -rf nothing | cat"
    weird.mkdir(parents=True)
    (weird / "corpus.json").write_text(json.dumps({"format": "s2i-corpus", "version": 1}))
    calls = []

    class FakePopen:
        def __init__(self, argv, **kwargs):
            calls.append((argv, kwargs))
            self.pid = 1

        def poll(self):
            return 0

    monkeypatch.setattr(s2i_app.subprocess, "Popen", FakePopen)
    trainer = s2i_app.Trainer(tmp_path / "runs", data)
    assert weird.name in trainer.corpora()
    trainer.start("rnn_vq_small", weird.name, 1, "cpu")
    (argv, kwargs), = calls
    assert isinstance(argv, list) and not kwargs.get("shell")
    assert f"data={weird}" in argv  # one argument, metacharacters and all
    assert argv[argv.index("train") + 1] == "rnn_vq_small"
    assert not list(tmp_path.rglob("pwned")) and not (REPO / "pwned").exists()


def test_load_checkpoint_stays_inside_checkpoints_and_runs(served_app, tmp_path):
    from gradio_client.exceptions import AppError

    elsewhere = shutil.copytree(served_app.ckpt, tmp_path / "elsewhere" / "model")
    client = served_app.client()
    try:
        with pytest.raises(AppError):
            client.predict(str(elsewhere), api_name="/load_checkpoint")
    finally:
        client.predict(str(served_app.ckpt), api_name="/load_checkpoint")  # the fixture's model back
        assert served_app.demo.s2i_loaded().checkpoint == str(served_app.ckpt)


# ---------------------------------------------------------------------------------------------
# what Gradio serves
# ---------------------------------------------------------------------------------------------
def _get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_gradio_serves_only_the_allowed_paths(served_app, tmp_path):
    import app as s2i_app

    base = served_app.url.rstrip("/")
    allowed = s2i_app.allowed_paths(served_app.demo)
    assert str(REPO) not in allowed and "/" not in allowed and "/tmp" not in allowed
    # control: a file of the exported gallery is served
    status, body = _get(f"{base}/gradio_api/file={served_app.ckpt / 'gallery.json'}")
    assert status == 200 and b"s2i-gallery" in body
    secret = served_app.root / "secret.txt"  # beside, not inside, the allowed folders
    secret.write_text("SECRET")
    inside = served_app.ckpt
    link = served_app.ckpt.parent / "link-out"
    if not link.exists():
        os.symlink(secret, link)
    dirlink = served_app.ckpt.parent / "dir-out"
    if not dirlink.exists():
        os.symlink("/etc", dirlink)
    hostile = ["/etc/passwd", "//etc/passwd", "%2Fetc%2Fpasswd", "../../../../../../etc/passwd",
               "/proc/self/environ", str(secret), f"{inside}/../../secret.txt", f"{inside}/%2e%2e/%2e%2e/secret.txt",
               f"{inside}/..%2f..%2fsecret.txt", str(link), f"{dirlink}/passwd", str(REPO / "app.py"),
               str(REPO / ".git" / "config"), "app.py", str(Path(os.path.expanduser("~")) / ".bashrc"),
               str(served_app.root / "data")]
    served = []
    for path in hostile:
        for route in ("/gradio_api/file=", "/file=", "/gradio_api/file/"):
            status, body = _get(base + route + path)
            if status == 200 or b"root:" in body or b"SECRET" in body:
                served.append(f"{route}{path}: {status} {body[:60]!r}")
    for route in ("/static/", "/assets/", "/gradio_api/"):
        status, body = _get(f"{base}{route}..%2f..%2f..%2f..%2f..%2fetc%2fpasswd")
        if b"root:" in body:
            served.append(f"{route} traversal: {status}")
    assert not served, served
