"""s2i.files: whole-file replacement and versioned JSON headers."""
import json

import pytest

from s2i.files import read_header, replace_file, write_text


class HeaderError(Exception):
    pass


def test_replace_file_keeps_the_old_file_when_the_write_dies(tmp_path):
    path = tmp_path / "meta.json"
    write_text(path, "old")

    def dying(p):
        p.write_text("half")
        raise KeyboardInterrupt("simulated kill")

    with pytest.raises(KeyboardInterrupt):
        replace_file(path, dying)
    assert path.read_text() == "old"
    write_text(path, "néw")
    assert path.read_text(encoding="utf-8") == "néw" and not (tmp_path / "meta.json.tmp").exists()


@pytest.mark.parametrize("content, message", [
    ('{"format": "s2i-thing", "version": 1, "x": 3}', None),
    ('{"format": "s2i-thing"}', None),  # no version: the first
    ("{not json", "not valid JSON"),
    (b"\xff\xfe\x00binary", "not valid JSON"),
    ("[1, 2]", r"not an s2i thing \(format 'list', expected 's2i-thing'\)"),
    ('{"format": "s2i-other", "version": 1}', r"not an s2i thing \(format 's2i-other', expected 's2i-thing'\)"),
    ('{"format": "s2i-thing", "version": 2}', "has version 2; this s2i reads up to 1"),
    ('{"format": "s2i-thing", "version": "x"}', "has version 'x'; this s2i reads up to 1"),
])
def test_read_header(tmp_path, content, message):
    path = tmp_path / "header.json"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    if message is None:
        assert read_header(path, "s2i-thing", 1, HeaderError, "thing") == json.loads(content)
    else:
        with pytest.raises(HeaderError, match=message):
            read_header(path, "s2i-thing", 1, HeaderError, "thing")


@pytest.mark.parametrize("content, ok", [
    ('{"format": "s2i-thing", "version": 2}', True),
    ('{"format": "s2i-thing", "version": 1}', False),
    ('{"format": "s2i-thing"}', False),  # no version: older than any
])
def test_read_header_oldest(tmp_path, content, ok):
    path = tmp_path / "header.json"
    path.write_text(content)
    if ok:
        assert read_header(path, "s2i-thing", 2, HeaderError, "thing", oldest=2)["version"] == 2
    else:
        with pytest.raises(HeaderError, match="this s2i reads versions 2 to 2: prepare it again"):
            read_header(path, "s2i-thing", 2, HeaderError, "thing", "prepare it again", oldest=2)


def test_corpus_without_a_version_is_refused(tmp_path):
    from s2i.datasets.corpus import CorpusError, read_corpus

    (tmp_path / "corpus.json").write_text('{"format": "s2i-corpus", "splits": {}}')
    with pytest.raises(CorpusError, match="has version None; this s2i reads versions 1 to 1: re-run"):
        read_corpus(tmp_path)
