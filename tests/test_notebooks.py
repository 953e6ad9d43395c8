"""The analysis notebooks (``notebooks/*.ipynb``) run top to bottom on a checkpoint's exported gallery.

They are executed with nbclient in a ``python3`` kernel of this very interpreter, on small settings,
against ``checkpoints/default`` when it has an exported gallery, else against a gallery exported here
from a small synthesised corpus and an untrained model, the corpus then removed: as on a fresh clone,
where ``data/`` does not exist and the gallery is all there is.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest
import torch

from s2i.gallery import Gallery, find_gallery

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = REPO / "notebooks"
RESULT = "NOTEBOOK-RESULT "  # prefix of the line the test's last cell prints


def _nested_scenes(corpus: Path, split: str = "test") -> None:
    """Rewrite the fixture corpus's flat scenes ``{colour, shape}`` in the built-in synthetic corpus's form
    (a layout and a list of objects), so that the notebooks meet the nested scenes of a real gallery."""
    path = corpus / f"{split}.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for r in records:
        flat = r["scene"]
        r["scene"] = {"layout": "single", "objects": [{"kind": flat["shape"], "colour": flat["colour"]}]}
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """``"default"`` when the committed default checkpoint has a gallery, else a freshly exported folder."""
    if find_gallery(REPO / "checkpoints" / "default") is not None:
        return "default"
    from s2i.cli import main as cli
    from tests.test_export import make_checkpoint, make_corpus

    root = tmp_path_factory.mktemp("notebooks")
    corpus = make_corpus(root / "corpus", n_images=8, captions_per_image=2)
    _nested_scenes(corpus)
    ckpt = make_checkpoint(root / "model", corpus, name="resdavenet_vq_small")
    assert cli(["export", str(ckpt), "--data", str(corpus), "--layout", "pca", "--max-clips", "6",
                "--thumb-size", "48"]) == 0
    shutil.rmtree(corpus)  # the notebooks must live on the gallery alone
    return str(ckpt)


def _gallery(checkpoint: str) -> Gallery:
    folder = Path(checkpoint) if Path(checkpoint).is_dir() else REPO / "checkpoints" / checkpoint
    return Gallery.load(folder)


def run_notebook(name: str, parameters: dict, report: str) -> tuple[nbformat.NotebookNode, dict]:
    """Execute ``notebooks/<name>`` with ``parameters`` set after its parameters cell (as papermill does) and
    ``report`` (an expression) printed as JSON by an appended cell; returns the executed notebook and that JSON."""
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    where = next(k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    lines = [f"{key} = {value!r}" for key, value in parameters.items()]
    lines.append(f"import sys as _sys\nassert _sys.prefix == {sys.prefix!r}, 'the kernel is not this interpreter'")
    injected = nbformat.v4.new_code_cell("\n".join(lines), metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(where + 1, injected)
    nb.cells.append(nbformat.v4.new_code_cell(f"import json as _json\nprint({RESULT!r} + _json.dumps({report}))"))
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}  # (the app sets Agg when imported)
    env["OMP_NUM_THREADS"] = "1"  # a shared machine
    client = NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    client.execute(env=env)
    nb.metadata["seconds"] = time.perf_counter() - start
    printed = "".join(o.get("text", "") for o in nb.cells[-1].outputs if o.output_type == "stream")
    line = next(x for x in printed.splitlines() if x.startswith(RESULT))
    return nb, json.loads(line[len(RESULT):])


def _outputs(nb: nbformat.NotebookNode) -> tuple[int, str]:
    """The number of figures the notebook drew and all the text it showed."""
    figures, text = 0, []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "error":
                pytest.fail(f"{out.ename}: {out.evalue}")
            data = out.get("data", {})
            figures += "image/png" in data
            text.append(out.get("text", "") + data.get("text/plain", ""))
    return figures, "\n".join(text)


@pytest.mark.parametrize("name", ["units.ipynb", "retrieval.ipynb"])
def test_committed_notebooks_are_valid_and_cleared(name):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", []) and "CHECKPOINT = \"default\"" in code[0].source
    assert all(not c.outputs and c.execution_count is None for c in code), "commit notebooks with cleared outputs"
    raw = json.loads((NOTEBOOKS / name).read_text(encoding="utf-8"))  # nbformat.read fills missing ids in silently
    assert all(c.get("id") for c in raw["cells"]), "every cell needs an id (nbformat 4.5; later versions refuse none)"


def test_units_notebook(checkpoint):
    g = _gallery(checkpoint)
    n = min(g.num_captions, 1000)
    nb, result = run_notebook("units.ipynb", {"CHECKPOINT": checkpoint, "SMALL": True, "MAX_CAPTIONS": n},
                              "{'layers': layers, 'captions': n, 'examples': examples, "
                              "'bitrate': {k: r.bitrate for k, r in rates.items()}, "
                              "'detected': {k: d.n_detected for k, d in detections.items()}, "
                              "'accents': sorted(set(accents)), 'by': globals().get('by', {})}")
    figures, text = _outputs(nb)
    layers = g.code_layers()
    assert result["layers"] == layers and result["captions"] == n
    # what it computed is the gallery's: the bitrate of the stored codes over the captions' durations
    from s2i.analysis import bitrate

    seconds = [c["seconds"] for c in g.captions[:n]]
    for layer in layers:
        codes = [g.caption_codes(layer, j).numpy() for j in range(n)]
        assert result["bitrate"][layer] == pytest.approx(bitrate(codes, seconds).bitrate)
    # timelines of captions with a clip (the corpus is absent), one F1 scatter, one bitrate chart
    assert result["examples"] and all(g.audio_path(j) is not None for j in result["examples"])
    assert set(result["detected"]) == set(layers)
    assert figures == len(result["examples"]) + 2
    assert "most used codes" in text and "best word" in text
    # per accent: the captions grouped by the accent before the voice's "+", each group counted alone
    accents = sorted({c["speaker"].split("+", 1)[0] for c in g.captions[:n]})
    assert result["accents"] == accents
    if len(accents) > 1:
        from s2i.analysis import word_detection

        for a in accents:
            index = [j for j, c in enumerate(g.captions[:n]) if c["speaker"].split("+", 1)[0] == a]
            for layer in layers:
                alone = word_detection([g.caption_codes(layer, j).numpy() for j in index],
                                       [[tuple(w) for w in g.captions[j]["words"]] for j in index], g.frame_shift(layer))
                assert result["by"][a]["n_utterances"] == len(index)
                assert result["by"][a]["layers"][layer]["n_detected"] == alone.n_detected
        assert "same best code" in text
    print(f"units.ipynb ran in {nb.metadata['seconds']:.1f} s; accents {accents}")


def test_retrieval_notebook(checkpoint):
    g = _gallery(checkpoint)
    m = min(g.num_images, 200)
    nb, result = run_notebook("retrieval.ipynb", {"CHECKPOINT": checkpoint, "SMALL": True, "MAX_IMAGES": m},
                              "{'results': results, 'worst': worst, 'wrong': len(wrong), "
                              "'attributes': names, 'layout_keys': keys, 'groups': recall_by}")
    figures, text = _outputs(nb)
    # R@k as the metrics module gives it for the gallery's first m images and their captions
    from s2i.metrics import retrieval_metrics

    keep = g.caption_image < m
    speech = torch.nn.functional.normalize(g.speech_embeddings[keep], dim=-1)
    images = torch.nn.functional.normalize(g.image_embeddings[:m], dim=-1)
    expected = retrieval_metrics(speech @ images.T, g.caption_image[keep])
    for direction, row in expected.items():
        for key, value in row.items():
            assert result["results"][direction][key] == pytest.approx(value, abs=1e-6)
    assert ("text_to_image" in result["results"]) == g.has_text
    wrong = round((1 - expected["speech_to_image"]["R@1"]) * int(keep.sum()))
    assert result["wrong"] == pytest.approx(wrong, abs=1)  # (R@1 counts ties pessimistically, argmax does not)
    # recall per group of captions: the evaluate module's breakdown, for each field the records have
    from s2i.evaluate import breakdown, group_key

    records = [{**g.captions[j], "scene": g.images[int(g.caption_image[j])].get("scene") or {}}
               for j in torch.nonzero(keep).flatten().tolist()]
    assert "scene.layout" in result["groups"]  # every synthetic scene has a layout
    for by, per in result["groups"].items():
        want = breakdown(speech, images, g.caption_image[keep], None, [group_key(r, by) for r in records])
        assert list(per) == list(want) and sum(grp["captions"] for grp in per.values()) == int(keep.sum())
        for name, grp in per.items():
            assert grp["speech_to_image"]["R@1"] == pytest.approx(want[name]["speech_to_image"]["R@1"], abs=1e-6)
    # failures: distinct images, as many as shown; the scenes' attributes, objects included
    assert len({int(g.caption_image[keep][j]) for j in result["worst"]}) == len(result["worst"]) <= 4
    if all("objects" in (im.get("scene") or {}) for im in g.images[:m]):  # the synthetic corpus's scenes
        assert {"colour", "kind", "number of objects", "objects as wholes"} <= set(result["attributes"])
        assert result["layout_keys"] and result["layout_keys"][0].endswith("colour")
    # the per-group bars, failure thumbnails, the attribute bar chart, the similarity panels, the layout
    assert figures == 1 + (1 if result["worst"] else 0) + (1 if result["wrong"] else 0) + 2
    assert "R@1" in text and "hardest negative" in text
    print(f"retrieval.ipynb ran in {nb.metadata['seconds']:.1f} s")
