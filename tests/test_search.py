import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from s2i import search as search_module
from s2i.search import Index, SearchError, load_gallery, search


def unit(n, d, seed=0):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def clustered(n, d, clusters, sigma=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = F.normalize(torch.randn(clusters, d, generator=g), dim=1)
    labels = torch.randint(0, clusters, (n,), generator=g)
    return F.normalize(centres[labels] + sigma * torch.randn(n, d, generator=g) / d ** 0.5, dim=1)


def brute_force(queries, gallery, k):
    scores = queries @ gallery.T
    order = scores.argsort(dim=1, descending=True)[:, :k]
    return scores.gather(1, order), order


def recall_at(found, truth):
    return np.mean([len(set(a.tolist()) & set(b.tolist())) / truth.shape[1] for a, b in zip(found, truth)])


# ------------------------------------------------------------------------------ exact search
@pytest.mark.parametrize("chunk", [1 << 24, 64, 7])
def test_exact_search_matches_brute_force_in_any_chunking(chunk, monkeypatch):
    monkeypatch.setattr(search_module, "CHUNK_ELEMENTS", chunk)
    gallery, queries = unit(300, 16, 0), unit(20, 16, 1)
    scores, indices = search(queries, gallery, k=10)
    ref_scores, ref_indices = brute_force(queries, gallery, 10)
    assert scores.shape == indices.shape == (20, 10)
    assert torch.allclose(scores, ref_scores, atol=1e-6)
    assert torch.equal(indices, ref_indices)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_exact_search_edge_cases():
    gallery = unit(4, 8)
    scores, indices = search(gallery[2], gallery, k=10)  # one (D,) query, k capped at N
    assert indices.shape == (1, 4) and indices[0, 0] == 2 and scores[0, 0] == pytest.approx(1.0)
    with pytest.raises(SearchError, match="dimension 3 but the gallery 8"):
        search(torch.zeros(1, 3), gallery)
    with pytest.raises(SearchError, match="positive integer"):
        search(gallery, gallery, k=0)
    with pytest.raises(SearchError, match="matrix"):
        search(torch.zeros(2, 2, 2), gallery)


# ------------------------------------------------------------------------------ Index
def test_exact_index_with_ids():
    gallery = unit(50, 8)
    index = Index(gallery, ids=[f"img{i}.png" for i in range(50)])
    assert index.method == "exact" and len(index) == 50 and index.dim == 8 and index.nprobe is None
    scores, indices = index.search(gallery[[3, 7]], k=2)
    assert indices[:, 0].tolist() == [3, 7]
    assert index.lookup(indices[:, 0]) == ["img3.png", "img7.png"]
    assert Index(gallery).lookup(torch.tensor([5])) == [5]
    with pytest.raises(SearchError, match="2 ids for 50 vectors"):
        Index(gallery, ids=["a", "b"])
    with pytest.raises(SearchError, match="unknown index method"):
        Index(gallery, method="hnsw")


def test_auto_switches_to_ivf_above_the_threshold(monkeypatch):
    monkeypatch.setattr(search_module, "APPROX_THRESHOLD", 1000)
    assert Index(unit(999, 8)).method == "exact"
    index = Index(unit(1000, 8))
    assert index.method == "ivf" and index.nlist == round(1000 ** 0.5) and index.nprobe == 16


def test_ivf_recall_on_clustered_data_and_exact_when_probing_all_cells():
    gallery = clustered(4000, 32, clusters=40)
    queries = clustered(4200, 32, clusters=40)[4000:]  # same centres (same seed), fresh points
    index = Index(gallery, method="ivf", nlist=64)
    assert index.nprobe == 16
    truth_scores, truth = search(queries, gallery, k=10)
    _, found = index.search(queries, k=10)
    assert recall_at(found, truth) >= 0.95
    index.nprobe = 1
    _, one_cell = index.search(queries, k=10)
    assert recall_at(one_cell, truth) < recall_at(found, truth)
    index.nprobe = 64  # every cell: the same answer as exact search
    scores, indices = index.search(queries, k=10)
    assert torch.allclose(scores, truth_scores, atol=1e-5)
    assert recall_at(indices, truth) == 1.0
    with pytest.raises(SearchError, match="nprobe must be in 1..64"):
        index.nprobe = 65


def test_ivf_answers_exactly_when_the_probed_cells_are_too_small():
    gallery = unit(400, 8)
    index = Index(gallery, method="ivf", nlist=40, nprobe=1)  # ~10 vectors per cell, 30 asked for
    scores, indices = index.search(gallery[:5], k=30)
    ref_scores, _ = search(gallery[:5], gallery, k=30)
    assert (indices >= 0).all()
    assert torch.allclose(scores, ref_scores, atol=1e-5)


@pytest.mark.parametrize("method", ["exact", "ivf"])
def test_save_and_load_round_trip(method, tmp_path):
    gallery = clustered(600, 16, clusters=6)
    ids = [f"utt-{i}" for i in range(600)]
    index = Index(gallery, ids, method=method, nlist=20 if method == "ivf" else None)
    if method == "ivf":
        index.nprobe = 3
    before = index.search(gallery[:10], k=5)
    (tmp_path / "model.safetensors").write_bytes(b"other files in the folder stay")
    index.save(tmp_path)
    assert (tmp_path / "model.safetensors").read_bytes() == b"other files in the folder stay"
    loaded = Index.load(tmp_path)
    assert (loaded.method, loaded.ids, loaded.nlist, loaded.nprobe) == (method, ids, index.nlist, index.nprobe)
    after = loaded.search(gallery[:10], k=5)
    assert torch.equal(before[1], after[1]) and torch.allclose(before[0], after[0])
    if method == "ivf":  # without the faiss file the index is rebuilt from the vectors
        (tmp_path / "index.faiss").unlink()
        rebuilt = Index.load(tmp_path)
        assert rebuilt.method == "ivf" and rebuilt.nprobe == 3
        assert torch.equal(rebuilt.search(gallery[:10], k=5)[1], before[1])


def test_load_refuses_what_is_not_an_index(tmp_path):
    with pytest.raises(SearchError, match="no s2i index"):
        Index.load(tmp_path)
    Index(unit(5, 4)).save(tmp_path)
    (tmp_path / "index.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(SearchError, match="not an s2i index"):
        Index.load(tmp_path)
    (tmp_path / "index.json").write_text("{broken")
    with pytest.raises(SearchError, match="not valid JSON"):
        Index.load(tmp_path)


# ------------------------------------------------------------------------------ galleries
def test_load_gallery_from_a_safetensors_file(tmp_path):
    from safetensors.torch import save_file

    vectors = unit(6, 4)
    save_file({"embeddings": vectors, "caption_image": torch.arange(6)}, str(tmp_path / "g.safetensors"),
              metadata={"ids": json.dumps([f"x{i}" for i in range(6)])})
    index = load_gallery(tmp_path / "g.safetensors")
    assert torch.equal(index.vectors, vectors) and index.ids[5] == "x5"
    save_file({"a": vectors, "b": vectors.clone()}, str(tmp_path / "two.safetensors"))
    with pytest.raises(SearchError, match="name the gallery tensor 'embeddings'"):
        load_gallery(tmp_path / "two.safetensors")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(SearchError, match="not a .safetensors file"):
        load_gallery(tmp_path / "notes.txt")
    with pytest.raises(SearchError, match="does not exist"):
        load_gallery(tmp_path / "missing")


def test_load_gallery_from_an_exported_gallery(tmp_path):
    gallery_module = pytest.importorskip("s2i.gallery")  # stores embeddings as float16
    images, speech = unit(3, 8, 0), unit(5, 8, 1)
    gallery_module.Gallery(root=tmp_path, image_embeddings=images, speech_embeddings=speech,
                           caption_image=torch.tensor([0, 0, 1, 2, 2]),
                           images=[{"image_id": f"i{i}", "path": f"images/{i}.png"} for i in range(3)],
                           captions=[{"utt_id": f"u{j}", "image_index": 0} for j in range(5)]).save(tmp_path)
    index = load_gallery(tmp_path, target="image")
    assert torch.allclose(index.vectors, images, atol=1e-3) and index.ids == ["images/0.png", "images/1.png", "images/2.png"]
    index = load_gallery(tmp_path, target="speech")
    assert torch.allclose(index.vectors, speech, atol=1e-3) and index.ids[4] == "u4"
    with pytest.raises(SearchError, match="no text embeddings"):
        load_gallery(tmp_path, target="text")


# ------------------------------------------------------------------------------ CLI, with a real (tiny, untrained) model
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from s2i.config import TextConfig, preset
    from s2i.model import build_model, save

    torch.manual_seed(0)
    cfg, _ = preset("rnn_small")
    cfg.embed_dim = 32
    cfg.speech.hidden_size = 16
    cfg.image.image_size, cfg.image.channels = 32, (8, 8)
    cfg.text = TextConfig(arch="word", embed_dim=16, hidden_size=16, vocab=["<pad>", "<unk>", "red", "blue", "circle"])
    return save(build_model(cfg).eval(), tmp_path_factory.mktemp("ckpt") / "tiny")


def run_cli(argv, capsys):
    from s2i.cli import main

    code = main(argv)
    out = capsys.readouterr()
    return code, out.out, out.err


def write_images(folder):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(folder / f"photo{i}.png")


def test_cli_image_query_over_an_image_folder(checkpoint, tmp_path, capsys):
    write_images(tmp_path / "photos")
    code, out, err = run_cli(["search", str(checkpoint), "--gallery", str(tmp_path / "photos"),
                              "--image", str(tmp_path / "photos" / "photo2.png"), "-k", "3", "--json",
                              "--save-index", str(tmp_path / "idx")], capsys)
    assert code == 0, err
    result = json.loads(out)
    assert result["method"] == "exact" and len(result["results"]) == 3
    top = result["results"][0]
    assert top["id"] == "photo2.png" and top["score"] == pytest.approx(1.0, abs=1e-4)
    # the saved index answers the same query without re-embedding the folder
    code, out, err = run_cli(["search", str(checkpoint), "--gallery", str(tmp_path / "idx"),
                              "--image", str(tmp_path / "photos" / "photo2.png")], capsys)
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split() == ["rank", "score", "id"] and lines[1].split()[2] == "photo2.png" and len(lines) == 5


def test_cli_speech_and_text_queries_against_embeddings(checkpoint, tmp_path, capsys):
    import soundfile as sf
    from safetensors.torch import save_file

    import s2i

    model = s2i.load(checkpoint)
    rng = np.random.default_rng(1)
    waves = [rng.standard_normal(16000 * (i + 1)).astype(np.float32) * 0.1 for i in range(3)]
    sf.write(tmp_path / "q.wav", waves[1], 16000)
    with torch.no_grad():
        speech = model.encode_speech(waves)
        text = model.encode_text(["red circle", "blue circle", "blue"])
    save_file({"embeddings": speech}, str(tmp_path / "speech.safetensors"),
              metadata={"ids": json.dumps(["a", "b", "c"])})
    save_file({"embeddings": text}, str(tmp_path / "text.safetensors"))
    code, out, err = run_cli(["search", str(checkpoint), "--gallery", str(tmp_path / "speech.safetensors"),
                              "--audio", str(tmp_path / "q.wav"), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["results"][0]["id"] == "b"
    code, out, err = run_cli(["search", str(checkpoint), "--gallery", str(tmp_path / "text.safetensors"),
                              "--text", "blue circle", "-k", "1", "--json"], capsys)
    assert code == 0, err
    assert [r["index"] for r in json.loads(out)["results"]] == [1]


def test_cli_errors_are_one_line(checkpoint, tmp_path, capsys):
    code, _, err = run_cli(["search", str(checkpoint), "--text", "red"], capsys)
    assert code == 1 and "no exported gallery" in err and "Traceback" not in err
    (tmp_path / "not_an_image.png").write_text("text")
    code, _, err = run_cli(["search", str(checkpoint), "--gallery", str(tmp_path),
                            "--image", str(tmp_path / "not_an_image.png")], capsys)
    assert code == 1 and "cannot read the image" in err
    from safetensors.torch import save_file

    save_file({"embeddings": unit(3, 7)}, str(tmp_path / "other.safetensors"))
    code, _, err = run_cli(["search", str(checkpoint), "--gallery", str(tmp_path / "other.safetensors"),
                            "--text", "red"], capsys)
    assert code == 1 and "same model" in err
