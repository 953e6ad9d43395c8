"""The Gradio app through its API: every endpoint called with gradio_client against an in-process server.

The app runs on a small model the tests build (untrained: these tests check what each endpoint
returns and how bad input is answered, not retrieval quality) with a gallery exported from a corpus
the tests synthesise.
"""
from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import gradio as gr
import numpy as np
import pytest
import soundfile

import s2i
from s2i.audio import load_audio
from s2i.cli import main as cli
from s2i.gallery import Gallery
from s2i.search import search
from tests.test_export import make_checkpoint, make_corpus

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from gradio_client.exceptions import AppError  # noqa: E402

import app as s2i_app  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(demo):
    port = free_port()
    s2i_app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    return Client(f"http://127.0.0.1:{port}/", verbose=False, analytics_enabled=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("app")
    corpus = make_corpus(root / "data" / "shapes", n_images=8, captions_per_image=2, splits=("train", "val", "test"))
    ckpt = make_checkpoint(root / "ckpt", corpus)
    assert cli(["export", str(ckpt), "--data", str(corpus), "--layout", "pca", "--max-clips", "4"]) == 0
    demo = s2i_app.build_demo(str(ckpt), runs_root=root / "runs", data_root=root / "data", export_layout="pca")
    client = serve(demo)
    yield {"root": root, "corpus": corpus, "ckpt": ckpt, "demo": demo, "client": client,
           "model": s2i.load(ckpt), "gallery": Gallery.load(ckpt)}
    demo.s2i_trainer.stop()
    demo.close()


def caption_wav(world, j: int) -> str:
    g = world["gallery"]
    return str(world["corpus"] / "audio" / g.captions[j]["audio"])


def value(x):
    """The value of an output, whether returned plainly or as a component update (a dict)."""
    return x.get("value") if isinstance(x, dict) and x.get("__type__") == "update" else x


def write(path: Path, samples: np.ndarray, rate: int) -> str:
    soundfile.write(path, samples, rate)
    return str(path)


# ------------------------------------------------------------------ search
def test_search_speech_ranks_the_gallery_like_the_model(world):
    wav = caption_wav(world, 5)
    items, spectrogram, status, *_ = world["client"].predict(handle_file(wav), 5, api_name="/search_speech")
    model, g = world["model"], world["gallery"]
    scores, idx = search(model.encode_speech(load_audio(wav)), g.image_embeddings, k=5)
    assert [it["caption"].split()[1] for it in items] == [g.images[i]["image_id"] for i in idx[0].tolist()]
    shown = [float(it["caption"].split("·")[1]) for it in items]
    assert shown == pytest.approx(scores[0].tolist(), abs=1e-3)
    assert all(Path(it["image"]).is_file() for it in items)
    assert Path(spectrogram).is_file() and "searched 8 images" in status


def test_search_text_and_empty_text(world):
    items, status, *_ = world["client"].predict("a red circle", 3, api_name="/search_text")
    assert len(items) == 3 and "a red circle" in status
    with pytest.raises(AppError, match="Type a description"):
        world["client"].predict("   ", 3, api_name="/search_text")


def test_image_to_speech_lists_nearest_captions_with_audio(world):
    picked, text, *players = world["client"].predict(2, api_name="/image_to_speech")
    g = world["gallery"]
    assert Path(picked).is_file() and "img002" in text
    assert len(players) == 5 and all(value(p) and Path(value(p)).is_file() for p in players)
    listed = [line for line in text.splitlines() if line[:1].isdigit()]
    assert len(listed) == 5 and all(any(c["text"] in line for c in g.captions) for line in listed)
    with pytest.raises(AppError, match="no image #99"):
        world["client"].predict(99, api_name="/image_to_speech")


def test_browse_shows_gallery_images(world):
    items = world["client"].predict(0, api_name="/browse")
    assert len(items) == 8 and all(Path(it["image"]).is_file() for it in items)


# ------------------------------------------------------------------ bad input
def test_bad_audio_gives_readable_messages_and_the_server_keeps_serving(world, tmp_path):
    client = world["client"]
    rng = np.random.default_rng(0)
    with pytest.raises(AppError, match="silent"):
        client.predict(handle_file(write(tmp_path / "silence.wav", np.zeros(16000, np.float32), 16000)), 5,
                       api_name="/search_speech")
    speech, _ = soundfile.read(caption_wav(world, 0), dtype="float32")
    with pytest.raises(AppError, match="too short"):
        client.predict(handle_file(write(tmp_path / "short.wav", speech[3000:4600], 16000)), 5,
                       api_name="/search_speech")
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio\n" * 50)
    with pytest.raises(AppError, match="not a readable audio file"):
        client.predict(handle_file(str(not_audio)), 5, api_name="/search_speech")
    with pytest.raises(AppError, match="Record or upload"):
        client.predict(None, 5, api_name="/search_speech")
    # stereo at 48 kHz: mixed down and resampled, then searched
    stereo = np.stack([np.interp(np.arange(len(speech) * 3) / 3, np.arange(len(speech)), speech)] * 2, axis=1)
    items, _, status, *_ = client.predict(handle_file(write(tmp_path / "stereo.wav", stereo, 48000)), 5,
                                          api_name="/search_speech")
    assert len(items) == 5 and f"({len(speech) / 16000:.1f} s)" in status
    # ten minutes: only the first 30 s are used
    long = write(tmp_path / "long.wav", (0.05 * rng.standard_normal(600 * 16000)).astype(np.float32), 16000)
    items, _, status, *_ = client.predict(handle_file(long), 5, api_name="/search_speech")
    assert len(items) == 5 and "(30.0 s)" in status
    # still serving
    items, *_ = client.predict(handle_file(caption_wav(world, 1)), 5, api_name="/search_speech")
    assert len(items) == 5


def test_uploads_over_the_size_limit_are_refused(world, tmp_path):
    big = tmp_path / "big.wav"
    soundfile.write(big, np.zeros(16000 * 60 * 14, np.int16), 16000, subtype="PCM_16")  # 27 MB > 25 MB
    with pytest.raises(Exception, match="(?i)size|large|413"):
        world["client"].predict(handle_file(str(big)), 5, api_name="/search_speech")


# ------------------------------------------------------------------ VQ units
def test_units_of_a_gallery_caption_and_browsing_a_code(world):
    client = world["client"]
    picture, usage, summary, code_choices, layer, *_ = client.predict(3, "vq1", api_name="/units_caption")
    assert Path(picture).is_file() and Path(usage).is_file()
    assert "perplexity" in summary and "vq1" in summary
    model = world["model"]
    codes = model.units(load_audio(caption_wav(world, 3)))["vq1"].codes
    first = int(np.bincount(codes.numpy()).argmax())  # the most frequent code comes first
    assert value(code_choices) == first and value(layer) == "vq1"
    here, elsewhere, text = client.predict("vq1", first, api_name="/code_info")
    assert Path(here).is_file() and f"**Code {first}** of vq1" in text
    assert Path(elsewhere).is_file() and "In the gallery" in text
    n_frames = int((codes == first).sum())
    assert len(load_audio(here)) >= n_frames * 0.02 * 16000 * 0.9
    with pytest.raises(AppError, match="not in the list of choices"):
        client.predict("vq1", 10_000, api_name="/code_info")


def test_units_of_a_recording(world):
    picture, usage, summary, *_ = world["client"].predict(handle_file(caption_wav(world, 0)), "vq2",
                                                           api_name="/units_audio")
    assert Path(picture).is_file() and "vq2" in summary


# ------------------------------------------------------------------ embeddings and matchmaps
def test_embeddings_layout_with_the_query_placed(world):
    client = world["client"]
    frame, note = client.predict("modality", api_name="/embeddings")
    groups = [row[2] for row in frame["data"]]
    assert groups.count("image") == 8 and groups.count("speech") == 16 and groups.count("text") == 16
    client.predict("a green square", 5, api_name="/search_text")
    frame, note = client.predict("colour", api_name="/embeddings")
    groups = [row[2] for row in frame["data"]]
    assert "★ query" in groups and set(groups) - {"★ query"} == {"red", "green", "blue", "yellow"}
    assert "a green square" in note


def test_matchmap_overlays(world):
    overall, at_t, curve, note, _ = world["client"].predict(handle_file(caption_wav(world, 2)), 1, 0.3,
                                                            api_name="/matchmap")
    assert all(Path(p).is_file() for p in (overall, at_t, curve))
    assert "8×8 image regions" in note  # rnn_vq_small's CNN: 128 px -> 8 x 8


# ------------------------------------------------------------------ evaluation
def test_evaluation_matches_the_evaluate_module(world):
    from s2i.evaluate import evaluate

    by = "speaker~^([^+]+)"  # the accent
    table, note, groups, cases, cases_text, *players = world["client"].predict(True, by, api_name="/evaluate")
    rows = {r[0]: r for r in table["data"]}
    expected = evaluate(world["model"], world["corpus"], split="test", by=by)
    assert rows["speech → image"][1:4] == pytest.approx(
        [round(100 * expected["speech_to_image"][k], 1) for k in ("R@1", "R@5", "R@10")])
    assert set(rows) == {"speech → image", "image → speech", "text → image", "image → text"}
    assert "embedded now" in note
    # the breakdown: one row per accent, as the evaluate module's
    want = expected["by"]["groups"]
    assert [r[0] for r in groups["data"]] == list(want) and len(want) > 1
    for name, captions, s_r1, s_r10, t_r1, t_r10 in groups["data"]:
        assert captions == want[name]["captions"]
        assert [s_r1, t_r10] == pytest.approx([round(100 * want[name]["speech_to_image"]["R@1"], 1),
                                               round(100 * want[name]["text_to_image"]["R@10"], 1)])
    # from the stored embeddings, grouped by a field of the image's scene; nothing grouped without `by`
    table, note, groups, *_ = world["client"].predict(False, "scene.shape", api_name="/evaluate")
    g = world["demo"].s2i_loaded().gallery
    assert sum(r[1] for r in groups["data"]) == g.num_captions
    assert {r[0] for r in groups["data"]} == {img["scene"]["shape"] for img in g.images}
    table, note, groups, cases, cases_text, *players = world["client"].predict(False, "", api_name="/evaluate")
    assert len(table["data"]) == 4 and "exported embeddings" in note and not groups["data"]
    assert len(cases) == 8 and "Hardest spoken captions" in cases_text and len(players) == 4
    assert all(Path(c["image"]).is_file() for c in cases)
    with pytest.raises(AppError, match="no field 'layout'"):
        world["client"].predict(False, "scene.layout", api_name="/evaluate")


# ------------------------------------------------------------------ training
def test_training_refuses_bad_arguments(world):
    client = world["client"]
    # the dropdowns refuse anything but their choices; the trainer checks again (callers other than the UI)
    for args in (("merkx2021_rnn", "shapes", 1, "cpu"), ("rnn_small", "../../etc", 1, "cpu"),
                 ("rnn_small", "shapes", 1, "tpu; rm -rf /")):
        with pytest.raises(AppError, match="not in the list of choices"):
            client.predict(*args, api_name="/train_start")
    with pytest.raises(AppError, match="1|whole number"):
        client.predict("rnn_small", "shapes", 0, "cpu", api_name="/train_start")
    with pytest.raises(AppError, match="(?i)number|float"):  # Gradio's own check, its message shown
        client.predict("rnn_small", "shapes", "ten", "cpu", api_name="/train_start")
    trainer = world["demo"].s2i_trainer
    for args, message in ((("merkx2021_rnn", "shapes", 1, "cpu"), "Unknown preset"),
                          (("rnn_small", "../../etc", 1, "cpu"), "No prepared corpus"),
                          (("rnn_small", "shapes", 2.5, "cpu"), "whole number from 1"),
                          (("rnn_small", "shapes", "2; ls", "cpu"), "whole number"),
                          (("rnn_small", "shapes", 1, "tpu"), "not available")):
        with pytest.raises(gr.Error, match=message):
            trainer.command(*args)
    assert not trainer.running()
    loss, recall, tail, status = client.predict(api_name="/train_progress")[:4]
    assert "No run started" in status
    assert "No run started" in client.predict(api_name="/train_stop")
    with pytest.raises(AppError, match="No finished run"):
        client.predict(api_name="/train_load")
    with pytest.raises(AppError, match="not a checkpoint folder"):
        client.predict(str(world["root"] / "nowhere"), api_name="/load_checkpoint")


def test_train_command_is_an_argument_list(world):
    argv, run_dir = world["demo"].s2i_trainer.command("rnn_vq_small", "shapes", 3, "cpu")
    assert argv[1:5] == ["-m", "s2i", "train", "rnn_vq_small"]
    assert "epochs=3" in argv and "device=cpu" in argv and f"out_dir={run_dir}" in argv


@pytest.mark.slow
def test_train_watch_stop_and_load_a_run(world):
    client = world["client"]
    status = client.predict("rnn_vq_small", "shapes", 2, "cpu", api_name="/train_start")[0]
    assert "Started" in status
    with pytest.raises(AppError, match="already going"):
        client.predict("rnn_small", "shapes", 1, "cpu", api_name="/train_start")
    deadline = time.time() + 240
    while time.time() < deadline:
        loss, recall, tail, status, _ = client.predict(api_name="/train_progress")
        if "finished" in status or "failed" in status:
            break
        time.sleep(2)
    assert "finished" in status, tail
    assert Path(loss).is_file() and Path(recall).is_file() and "R@10" in status
    run = world["demo"].s2i_trainer.run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("val" in r for r in rows)
    assert "already" not in client.predict(api_name="/train_stop")  # nothing running: just the status
    status, header, layer, _ = client.predict(api_name="/train_load")
    assert "Loaded" in status and run.name in header and value(layer) == "vq1"
    assert (run / "best" / "gallery.json").is_file()
    items, *_ = client.predict(handle_file(caption_wav(world, 0)), 5, api_name="/search_speech")
    assert len(items) == 5
    # and back to the first model
    status, header, *_ = client.predict(str(world["ckpt"]), api_name="/load_checkpoint")
    assert str(world["ckpt"]) in header


def test_stop_a_running_training(world, tmp_path):
    trainer = s2i_app.Trainer(tmp_path / "runs", world["root"] / "data")
    trainer.start("rnn_vq_small", "shapes", 50, "cpu")
    assert trainer.running()
    assert trainer.stop()
    assert trainer.wait(120) is not None and not trainer.running()
    assert "stopped" in trainer.status() or "finished" in trainer.status()


# ------------------------------------------------------------------ missing pieces
def test_app_starts_without_a_model_or_gallery(tmp_path, world):
    demo = s2i_app.build_demo(str(tmp_path / "nothing"), runs_root=tmp_path / "runs", data_root=tmp_path / "data")
    try:
        client = serve(demo)
        with pytest.raises(AppError, match="No model is loaded"):
            client.predict(handle_file(caption_wav(world, 0)), 5, api_name="/search_speech")
        with pytest.raises(AppError, match="No gallery"):
            client.predict(0, api_name="/image_to_speech")
    finally:
        demo.close()
    ckpt = make_checkpoint(tmp_path / "bare", world["corpus"])  # a model, no gallery
    loaded = s2i_app.Loaded.open(str(ckpt))
    assert loaded.model is not None and loaded.gallery is None
    assert "python -m s2i export" in loaded.describe()


def test_app_on_thumbnails_and_clips_only(world, tmp_path):
    """As on a Space: the checkpoint folder ships without the corpus."""
    import shutil

    copy = tmp_path / "space" / "ckpt"
    shutil.copytree(world["ckpt"], copy)
    gallery = Gallery.load(copy, corpus=tmp_path / "absent")
    demo = s2i_app.build_demo(str(copy), gallery, runs_root=tmp_path / "runs", data_root=tmp_path / "data")
    try:
        client = serve(demo)
        items, *_ = client.predict(handle_file(caption_wav(world, 0)), 5, api_name="/search_speech")
        assert all(Path(it["image"]).is_file() for it in items)
        picked, text, *players = client.predict(0, api_name="/image_to_speech")
        with_clip = {j for j, c in enumerate(gallery.captions) if c["clip"]}
        assert len(with_clip) == 4 and sum(value(p) is not None for p in players) <= 4
        assert "no audio exported" in json.dumps(players) or len(with_clip) >= 5
        with pytest.raises(AppError, match="has no audio here"):
            client.predict(min(set(range(gallery.num_captions)) - with_clip), "vq1", api_name="/units_caption")
        j = min(with_clip)
        picture, usage, summary, code, *_ = client.predict(j, "vq1", api_name="/units_caption")
        stored = gallery.caption_codes("vq1", j).numpy()
        assert value(code) == int(np.bincount(stored).argmax())  # the stored codes, not the lossy clip's
        table, note, *_ = client.predict(False, "", api_name="/evaluate")
        assert len(table["data"]) == 4
        with pytest.raises(AppError, match="not here"):
            client.predict(True, "", api_name="/evaluate")
    finally:
        demo.close()
