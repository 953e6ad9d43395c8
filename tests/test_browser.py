"""The app in a real browser: Debian's chromium driven by Playwright, with a fake microphone.

Chromium reads the "microphone" from a WAV file (``--use-file-for-fake-audio-capture``): a caption of a
gallery image, synthesised with a voice the gallery does not use. The test records it with the
microphone button, searches, and expects that image in the top 5. It also saves a screenshot of every
tab into ``docs/screenshots/``.

With the trained default checkpoint (``checkpoints/default`` and its exported gallery; or any trained
checkpoint with a gallery named by ``$S2I_BROWSER_CHECKPOINT``) the test checks retrieval; without it,
it runs the same steps on a small untrained model and checks only that the recording reached the
server whole (a random model retrieves at random).

Run with: ``bash scripts/test.sh -m browser tests/test_browser.py``
"""
from __future__ import annotations

import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import soundfile

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent
SCREENSHOTS = ROOT / "docs" / "screenshots"
DEFAULT = ROOT / "checkpoints" / "default"
QUERY_VOICE = ("en-gb-scotland", "benjamin")  # a voice variant the built-in corpus never uses


def _playwright():
    if not CHROMIUM.is_file():
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (apt-get install chromium chromium-driver)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("needs the playwright package (requirements-dev.txt)")
    return sync_playwright


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(checkpoint folder, trained?): $S2I_BROWSER_CHECKPOINT or the default checkpoint, if it has a gallery."""
    from s2i.gallery import find_gallery

    chosen = Path(os.environ.get("S2I_BROWSER_CHECKPOINT", DEFAULT))
    if find_gallery(chosen) is not None:
        return chosen, True
    from s2i.cli import main as cli
    from tests.test_export import make_checkpoint, make_corpus

    root = tmp_path_factory.mktemp("browser")
    corpus = make_corpus(root / "corpus", n_images=8, captions_per_image=2)
    ckpt = make_checkpoint(root / "ckpt", corpus)
    assert cli(["export", str(ckpt), "--data", str(corpus), "--layout", "pca", "--max-clips", "8"]) == 0
    return ckpt, False


def _query_wav(gallery, image: int, path: Path) -> tuple[Path, float]:
    """A new recording of one of ``image``'s captions, by a voice of its own, padded with silence."""
    from s2i.audio import to_mono_16k
    from s2i.datasets.speech_synthesis import synthesize

    text = gallery.captions[gallery.captions_of(image)[0]]["text"]
    utt = synthesize(text, voice=QUERY_VOICE[0], variant=QUERY_VOICE[1])
    wave = to_mono_16k(utt.audio, utt.sample_rate).numpy()
    pad = np.zeros(8000, np.float32)
    wave = np.concatenate([pad, 0.8 * wave / np.abs(wave).max(), pad])
    soundfile.write(path, wave, 16000, subtype="PCM_16")
    return path, len(wave) / 16000


def test_record_with_the_microphone_and_find_the_image(setup, tmp_path):
    sync_playwright = _playwright()
    import app as s2i_app
    from s2i.gallery import Gallery

    ckpt, trained = setup
    gallery = Gallery.load(ckpt)
    target = 3 % gallery.num_images
    wav, seconds = _query_wav(gallery, target, tmp_path / "query.wav")
    demo = s2i_app.build_demo(str(ckpt), runs_root=tmp_path / "runs", data_root=tmp_path / "data")
    port = _free_port()
    s2i_app.launch(demo, port=port, prevent_thread_lock=True, quiet=True)
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    args = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-proxy-server",
            "--use-fake-ui-for-media-stream",
            "--use-fake-device-for-media-stream", f"--use-file-for-fake-audio-capture={wav}%noloop"]
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=args)
            context = browser.new_context(viewport={"width": 1400, "height": 1000}, permissions=["microphone"])
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load")
            page.locator("#query_audio button.record-button").wait_for(timeout=60_000)
            page.locator("#query_audio button.record-button").click()
            page.wait_for_timeout(int((seconds + 0.7) * 1000))
            page.locator("#query_audio button.stop-button").click()
            page.wait_for_timeout(1200)
            page.locator("#search_speech").click()
            page.locator("#search_status", has_text="searched").wait_for(timeout=60_000)
            page.locator("#results img").nth(4).wait_for(timeout=30_000)
            status = page.locator("#search_status").inner_text()
            page.wait_for_timeout(500)
            page.screenshot(path=str(SCREENSHOTS / "search.png"), full_page=True)

            heard = float(re.search(r"Spoken query \(([\d.]+) s\)", status).group(1))
            # the whole file arrived (the recording goes on, silent, until the stop button)
            assert seconds - 0.3 < heard < seconds + 3, status
            top5 = re.findall(r"image \*\*([^*]+)\*\*", page.locator("#search_status").inner_html()) or \
                re.findall(r"image (\S+) — score", status)
            assert len(top5) == 5, status
            if trained:
                assert gallery.images[target]["image_id"] in top5, (gallery.images[target], status)

            _tab(page, "VQ units")
            if demo.s2i_loaded().vq_layers():
                page.locator("#analyse_caption").click()
                page.get_by_text("perplexity").first.wait_for(timeout=60_000)
            _shot(page, "units.png")
            _tab(page, "Embeddings")
            page.get_by_role("button", name="Show").click()
            page.get_by_text("points (").first.wait_for(timeout=60_000)
            page.wait_for_timeout(1500)  # the plot draws itself
            _shot(page, "embeddings.png")
            _tab(page, "Matchmaps")
            page.get_by_role("button", name="Compute the matchmap").click()
            page.get_by_text("image regions").first.wait_for(timeout=60_000)
            _shot(page, "matchmaps.png")
            _tab(page, "Training")
            _shot(page, "training.png")
            _tab(page, "Evaluation")
            page.get_by_role("button", name=re.compile("Evaluate the loaded model")).click()
            page.get_by_text("Hardest spoken captions").first.wait_for(timeout=120_000)
            _shot(page, "evaluation.png")
            browser.close()
    finally:
        demo.close()
    (SCREENSHOTS / "README.md").write_text(
        "Screenshots of the app, taken by `tests/test_browser.py` (a real chromium, the query recorded through "
        f"its fake microphone).\n\nCheckpoint: `{_shown(ckpt) if trained else ckpt.name}`"
        f"{'' if trained else ' (an untrained stand-in: the default checkpoint was not there)'}.\n")


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.resolve().is_relative_to(ROOT) else str(path)


def _tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()
    page.wait_for_timeout(400)


def _shot(page, name: str) -> None:
    page.wait_for_timeout(600)
    page.screenshot(path=str(SCREENSHOTS / name), full_page=True)
