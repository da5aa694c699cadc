"""Character-level text: offline sources, vocabulary, contiguous splits, window datasets and samplers."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import manifoldnorm.data.text as text_mod
from manifoldnorm.data import (
    TEXT_SOURCES,
    CharVocab,
    CharWindows,
    RandomWindowSampler,
    eval_starts,
    load_text,
    split_text,
)


def test_pydoc_source_is_the_bundled_topics_in_key_order() -> None:
    from pydoc_data.topics import topics

    text = load_text()
    assert text == load_text("pydoc")
    keys = sorted(topics)
    assert text.startswith(topics[keys[0]]) and text.endswith(topics[keys[-1]])
    assert len(text) == sum(len(v) for v in topics.values()) > 300_000
    assert 60 < len(set(text)) < 200


def test_file_source_reads_utf8_plain_and_gzip(tmp_path: Path) -> None:
    content = "Grüße, naïve café — λx. x\nzweite Zeile\n"
    plain, packed = tmp_path / "t.txt", tmp_path / "t.txt.gz"
    plain.write_text(content, encoding="utf-8")
    packed.write_bytes(gzip.compress(content.encode("utf-8")))
    assert load_text("file", plain) == content
    assert load_text("file", str(packed)) == content


def test_file_source_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs path"):
        load_text("file")
    with pytest.raises(FileNotFoundError, match="not found"):
        load_text("file", tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_text("file", tmp_path / "empty.txt")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text("file", tmp_path / "latin1.txt")
    with pytest.raises(ValueError, match="unknown text source 'books'; valid: pydoc, file, jargon"):
        load_text("books")
    with pytest.raises(ValueError, match="takes no path"):
        load_text("pydoc", tmp_path / "empty.txt")
    assert TEXT_SOURCES == ("pydoc", "file", "jargon", "corpus")


def test_jargon_source_reads_installed_copy_or_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    installed = tmp_path / "usr" / "share" / "doc" / "jargon-text" / "jargon.txt.gz"
    installed.parent.mkdir(parents=True)
    installed.write_bytes(gzip.compress("glossary n. a list of terms — ünïcode kept\n".encode()))
    missing = str(tmp_path / "nowhere" / "jargon.txt")
    monkeypatch.setattr(text_mod, "JARGON_PATHS", (missing, str(installed)))
    assert load_text("jargon") == "glossary n. a list of terms — ünïcode kept\n"
    assert load_text("jargon", path=installed) == load_text("jargon")
    monkeypatch.setattr(text_mod, "JARGON_PATHS", (missing,))
    with pytest.raises(FileNotFoundError, match=r"apt install jargon-text.*source='file'"):
        load_text("jargon")


def test_char_vocab_encode_decode_and_errors() -> None:
    text = "hello, wörld!\n"
    vocab = CharVocab.from_text(text)
    assert vocab.chars == tuple(sorted(set(text))) and len(vocab) == len(set(text))
    ids = vocab.encode(text)
    assert ids.dtype == np.int64 and ids.shape == (len(text),)
    assert [vocab.chars[i] for i in ids] == list(text)
    assert vocab.decode(ids) == text == vocab.decode(torch.as_tensor(ids)) == vocab.decode(ids.tolist())
    assert "ö" in vocab and "z" not in vocab
    with pytest.raises(ValueError, match=r"2 character\(s\) not in the vocabulary: 'xz'"):
        vocab.encode("hex zero")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        vocab.decode([0, len(vocab)])
    with pytest.raises(ValueError, match="at least one character"):
        CharVocab("")
    with pytest.raises(TypeError, match="single characters"):
        CharVocab(["ab", "c"])


def test_split_text_is_contiguous_tail() -> None:
    text = "".join(chr(97 + i % 26) for i in range(1000))
    train, val, test = split_text(text, 0.1, 0.05)
    assert train + val + test == text
    assert (len(train), len(val), len(test)) == (850, 100, 50)
    train, val, test = split_text(text, 0.2)
    assert test == "" and val == text[800:] and train == text[:800]
    for bad in ({"val_fraction": 1.0}, {"val_fraction": -0.1}, {"val_fraction": 0.6, "test_fraction": 0.4}):
        with pytest.raises(ValueError, match="fraction"):
            split_text(text, **bad)
    with pytest.raises(ValueError, match="too short"):
        split_text("abc", 0.1)


def test_eval_starts_tile_or_spread() -> None:
    assert eval_starts(20, 4).tolist() == [0, 4, 8, 12]  # windows need T + 1 characters: starts 0 .. 15
    spread = eval_starts(1001, 10, count=5)
    assert spread.tolist() == [0, 248, 495, 742, 990]  # first and last valid start (1001 - 10 - 1)
    assert eval_starts(12, 10, count=50).tolist() == [0, 1]  # only two distinct windows exist
    with pytest.raises(ValueError, match="fewer than block_size"):
        eval_starts(10, 10)
    with pytest.raises(ValueError, match="count"):
        eval_starts(100, 10, count=0)


def test_char_windows_are_shifted_slices() -> None:
    ids = np.arange(100, 150)
    ds = CharWindows(ids, block_size=8)
    assert len(ds) == 50 - 8
    x, y, domain = ds[5]
    assert x.tolist() == list(range(105, 113)) and y.tolist() == list(range(106, 114))
    assert x.dtype == y.dtype == domain.dtype == torch.int64 and domain.item() == 0
    last_x, last_y, _ = ds[len(ds) - 1]
    assert last_y[-1].item() == 149
    fixed = CharWindows(ids, 8, starts=[0, 41])
    assert len(fixed) == 2 and fixed[1][1][-1].item() == 149
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(ValueError, match="must lie in 0 .. 41"):
        CharWindows(ids, 8, starts=[42])
    with pytest.raises(ValueError, match="block_size must be a positive int"):
        CharWindows(ids, 0)


def test_random_window_sampler_is_seeded_by_epoch() -> None:
    a, b = RandomWindowSampler(1000, 64, seed=3), RandomWindowSampler(1000, 64, seed=3)
    first = list(a)
    assert len(first) == len(a) == 64 and all(0 <= s < 1000 for s in first)
    assert first == list(a) == list(b)  # the same (seed, epoch): the same draw, however often iterated
    a.set_epoch(1)
    second = list(a)
    assert second != first
    b.set_epoch(1)
    assert list(b) == second  # a fresh sampler set to epoch 1 (a resumed run) agrees
    assert list(RandomWindowSampler(1000, 64, seed=4)) != first
    with pytest.raises(ValueError, match="num_samples"):
        RandomWindowSampler(10, 0)


# ------------------------------------------------------------------------------------------------ the corpus
def _fake_stdlib(root: Path, n: int = text_mod._STDLIB_MIN_FILES) -> Path:
    for i in range(n):
        pkg = root / ("pkg" if i % 2 else "") / f"mod{i:03d}.py"
        pkg.parent.mkdir(parents=True, exist_ok=True)
        pkg.write_text(f'"""Module {i}."""\n# comment one of {i}\n# comment two\nx = 1  # trailing: left out\n\n'
                       f'def f():\n    """Function of {i}."""\n\n\nclass C:\n    """Shared docstring."""\n')
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text('"""Tests are left out."""\n')
    return root


def test_corpus_is_the_parts_in_order_and_deterministic(tmp_path: Path) -> None:
    stdlib = _fake_stdlib(tmp_path / "lib")
    licenses = tmp_path / "licenses"
    licenses.mkdir()
    (licenses / "B-1.0").write_text("second license\n")
    (licenses / "A-2.0").write_text("first license\n")
    (licenses / "A").symlink_to(licenses / "A-2.0")  # Debian's GPL -> GPL-3 links: not read twice
    parts = text_mod.corpus_parts(stdlib, licenses)
    assert list(parts) == list(text_mod.CORPUS_PARTS) == ["common_licenses", "pydoc", "stdlib"]
    assert parts["common_licenses"] == "first license\n\nsecond license"
    assert parts["pydoc"] == load_text("pydoc")
    body = parts["stdlib"]
    assert body.startswith("Module 0.\n\ncomment one of 0\ncomment two\n\nFunction of 0.\n\nShared docstring.\n\n")
    assert body.count("Shared docstring.") == 1 and "trailing" not in body and "Tests are" not in body
    assert body.index("Module 1.") > body.index("Module 98.")  # sorted paths: mod*.py before pkg/mod*.py
    text = text_mod.load_corpus(stdlib, licenses, cache_dir=tmp_path / "cache")
    assert text == "\n\n".join(parts.values())
    (cached,) = (tmp_path / "cache" / "text").glob("corpus-*.txt")
    assert cached.read_text(encoding="utf-8") == text
    assert text_mod.load_corpus(stdlib, licenses, cache_dir=tmp_path / "cache") == text  # from the cache
    assert text_mod.load_corpus(stdlib, licenses, cache_dir=False) == text  # rebuilt: the same


def test_corpus_names_the_missing_part(tmp_path: Path) -> None:
    stdlib = _fake_stdlib(tmp_path / "lib")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"corpus part 'common_licenses'.*base-files"):
        text_mod.corpus_parts(stdlib, tmp_path / "no-licenses")
    with pytest.raises(FileNotFoundError, match=r"corpus part 'common_licenses'"):
        text_mod.corpus_parts(stdlib, empty)
    licenses = tmp_path / "licenses"
    licenses.mkdir()
    (licenses / "MIT").write_text("permission is hereby granted\n")
    with pytest.raises(FileNotFoundError, match=r"corpus part 'stdlib': no Python standard library at"):
        text_mod.load_corpus(tmp_path / "no-python", licenses, cache_dir=False)
    with pytest.raises(FileNotFoundError, match=r"corpus part 'stdlib'.*2 module files"):
        text_mod.corpus_parts(_fake_stdlib(tmp_path / "small", n=2), licenses)
    with pytest.raises(ValueError, match="takes no path"):
        load_text("corpus", path=tmp_path / "x.txt")


@pytest.mark.slow  # long: CI runs it in the bounded `-m slow` step
@pytest.mark.skipif(not Path(text_mod.COMMON_LICENSES_DIR).is_dir(), reason="not a Debian system")
def test_corpus_of_this_machine_is_large_and_splits_into_held_out_blocks(tmp_path: Path) -> None:
    """The real corpus: a few million characters, the same twice, train | val | test contiguous and disjoint."""
    text = text_mod.load_corpus(cache_dir=tmp_path)
    assert "corpus" in TEXT_SOURCES and 2_500_000 < len(text) < 5_000_000
    assert 90 < len(set(text)) < 300
    parts = text_mod.corpus_parts()
    assert text == "\n\n".join(parts.values()) == text_mod.load_corpus(cache_dir=tmp_path)
    assert len(parts["stdlib"]) > 1_500_000 and len(parts["common_licenses"]) > 100_000
    train, val, test = split_text(text, 0.1, 0.05)
    assert train + val + test == text and len(val) == round(0.1 * len(text))
    assert text.startswith(parts["common_licenses"]) and text.endswith(test)
    assert len(test) + len(val) < len(parts["stdlib"])  # held out: the end of the stdlib part only
    assert val[1000:1200] not in train and test[1000:1200] not in train
