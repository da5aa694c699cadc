"""Character-level text for language modelling: offline corpora, a character vocabulary, window datasets.

Sources of :func:`load_text` (:data:`TEXT_SOURCES`), all readable without a network connection:

``pydoc``
    The topic help texts shipped with CPython (``pydoc_data.topics``), joined in sorted-key order: about
    465 000 characters of English prose and Python code, available wherever Python is.
``file``
    A UTF-8 text file of the user (``path``; ``.gz`` files are decompressed).
``jargon``
    The Jargon File (Raymond, version 4.4.7, about 1.6 million characters) as installed by the Debian/Ubuntu
    package ``jargon-text`` (``apt install jargon-text``), or the copy given by ``path``.
``corpus``
    About 3 million characters assembled from what a Debian machine with CPython 3.11 already has
    (:func:`load_corpus`, parts in :data:`CORPUS_PARTS`): the license texts of ``/usr/share/common-licenses``
    (Debian's essential package ``base-files``), the ``pydoc`` topics, then the docstrings and full-line comments
    of the standard library's modules. Natural-ish English, but technical: license prose, Python documentation,
    code comments and docstrings with their examples, not general prose.

A model predicts character ``t + 1`` from characters ``0 .. t`` of a window of ``block_size`` characters: a
window starting at ``s`` is the pair ``x = ids[s : s + T]``, ``y = ids[s + 1 : s + T + 1]``.
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import io
import os
import sys
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler

__all__ = [
    "COMMON_LICENSES_DIR",
    "CORPUS_PARTS",
    "JARGON_PATHS",
    "TEXT_SOURCES",
    "CharVocab",
    "CharWindows",
    "RandomWindowSampler",
    "eval_starts",
    "corpus_parts",
    "load_corpus",
    "load_text",
    "split_text",
]

TEXT_SOURCES: tuple[str, ...] = ("pydoc", "file", "jargon", "corpus")
"""Names accepted by :func:`load_text`."""

JARGON_PATHS: tuple[str, ...] = (
    "/usr/share/doc/jargon-text/jargon.txt.gz",
    "/usr/share/doc/jargon-text/jargon.txt",
    "/usr/share/jargon-text/jargon.txt.gz",
    "/usr/share/jargon-text/jargon.txt",
)
"""Where the ``jargon-text`` package installs the Jargon File (the first existing one is read)."""


def _read_utf8(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"text file not found: {path}")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text ({err})") from None
    if not text:
        raise ValueError(f"{path} is empty")
    return text


def _pydoc_text() -> str:
    from pydoc_data.topics import topics

    return "".join(topics[key] for key in sorted(topics))


# ------------------------------------------------------------------------------------------------ the corpus
CORPUS_PARTS: tuple[str, ...] = ("common_licenses", "pydoc", "stdlib")
"""The parts of the ``corpus`` source, in the order they are concatenated (see :func:`corpus_parts`)."""

COMMON_LICENSES_DIR = "/usr/share/common-licenses"
"""Debian's license texts (package ``base-files``, essential: on every Debian/Ubuntu system)."""

CORPUS_VERSION = 1
"""Bumped whenever the way the corpus is assembled changes (it is part of the cache key)."""

# Folders of the standard library left out: tests, and the parts Debian ships in separate packages (idle, tk,
# 2to3, distutils, ensurepip), so that the text is the same for python.org/pyenv builds and Debian's python3.11.
_STDLIB_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "idlelib",
                               "lib2to3", "tkinter", "turtledemo", "distutils", "ensurepip", "__pycache__"})
_STDLIB_SKIP_FILES = frozenset({"turtle.py", "sitecustomize.py"})
_STDLIB_MIN_FILES = 100  # fewer .py files than this: not a standard library


def _stdlib_files(root: Path) -> list[Path]:
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if (set(rel.parts[:-1]) & _STDLIB_SKIP_DIRS or rel.parts[0].startswith("config-")
                or rel.name in _STDLIB_SKIP_FILES or rel.name.startswith("_sysconfigdata")):
            continue
        files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _module_text(source: bytes) -> list[str]:
    """Docstrings (module, classes, functions, methods) and full-line comment blocks of one module, in source
    order; ``[]`` for a file that does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    kinds = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
    items = [(getattr(node, "lineno", 0), doc) for node in ast.walk(tree)
             if isinstance(node, kinds) and (doc := ast.get_docstring(node, clean=True))]
    block: list[str] = []
    start = last = -1
    try:
        for tok in tokenize.tokenize(io.BytesIO(source).readline):
            if tok.type != tokenize.COMMENT or not tok.line.lstrip().startswith("#"):
                continue
            text = tok.string.lstrip("#").strip()
            if tok.string.startswith("#!") or not text or "coding" in text and tok.start[0] <= 2:
                continue
            if block and tok.start[0] != last + 1:
                items.append((start, "\n".join(block)))
                block = []
            if not block:
                start = tok.start[0]
            block.append(text)
            last = tok.start[0]
    except (tokenize.TokenError, SyntaxError):
        pass
    if block:
        items.append((start, "\n".join(block)))
    return [text for _, text in sorted(items, key=lambda item: item[0])]


def _stdlib_text(root: Path) -> str:
    files = _stdlib_files(root) if root.is_dir() else []
    if len(files) < _STDLIB_MIN_FILES:
        raise FileNotFoundError(f"corpus part 'stdlib': no Python standard library at {root} ({len(files)} "
                                f"module files, need >= {_STDLIB_MIN_FILES})")
    seen: set[str] = set()
    chunks = []
    for path in files:
        for text in _module_text(path.read_bytes()):
            if text not in seen:  # licence headers and shared docstrings once
                seen.add(text)
                chunks.append(text)
    return "\n\n".join(chunks)


def _licenses_text(root: Path) -> str:
    files = sorted(p for p in root.iterdir() if p.is_file() and not p.is_symlink()) if root.is_dir() else []
    if not files:
        raise FileNotFoundError(f"corpus part 'common_licenses': no license texts in {root} (Debian package "
                                "base-files); use another text with source='file'")
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in files)


def corpus_parts(stdlib_dir: str | Path | None = None, licenses_dir: str | Path | None = None) -> dict[str, str]:
    """The parts of the ``corpus`` source, ``{name: text}`` in :data:`CORPUS_PARTS` order.

    ``common_licenses``
        Every regular file of ``licenses_dir`` (default :data:`COMMON_LICENSES_DIR`; symbolic links such as
        ``GPL -> GPL-3`` skipped), sorted by name: about 250 000 characters of license prose.
    ``pydoc``
        Python's help topics, as the ``pydoc`` source (about 465 000 characters).
    ``stdlib``
        The docstrings (module, class, function, method; ``inspect.cleandoc``-ed) and full-line comment blocks
        (``#`` stripped) of the standard library's ``.py`` files under ``stdlib_dir`` (default: this Python's,
        ``sysconfig.get_paths()["stdlib"]``), read with ``ast``/``tokenize`` without importing anything, file by
        file in sorted path order, each in source order; a text repeated verbatim is kept once. Tests,
        ``site-packages`` and what Debian splits into other packages (idlelib, tkinter, turtle, lib2to3,
        distutils, ensurepip) are left out. About 2.3 million characters with CPython 3.11.

    Raises ``FileNotFoundError`` naming the part whose source is missing.
    """
    stdlib = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    licenses = Path(licenses_dir) if licenses_dir is not None else Path(COMMON_LICENSES_DIR)
    return {"common_licenses": _licenses_text(licenses), "pydoc": _pydoc_text(), "stdlib": _stdlib_text(stdlib)}


def load_corpus(stdlib_dir: str | Path | None = None, licenses_dir: str | Path | None = None,
                cache_dir: str | Path | None | bool = None) -> str:
    """The ``corpus`` source: :func:`corpus_parts` joined by blank lines (``"\\n\\n"``), in that order.

    Deterministic for a given Python installation and ``base-files`` version; the docstrings change a little
    between Python releases, so compare runs by the length and SHA-256 of the text (the validation and test
    splits, the last 15 % with the default fractions, are docstrings and comments of the alphabetically last
    modules, held out whole from training).

    Assembling takes a few seconds (parsing about 500 modules), so the text is cached as a UTF-8 file in
    ``cache_dir`` (default: ``$MANIFOLDNORM_CACHE`` or ``~/.cache/manifoldnorm``; ``False``: no cache), under a
    name that hashes the Python version, the source folders, the license files' sizes and times and
    :data:`CORPUS_VERSION`.
    """
    stdlib = Path(stdlib_dir) if stdlib_dir is not None else Path(sysconfig.get_paths()["stdlib"])
    licenses = Path(licenses_dir) if licenses_dir is not None else Path(COMMON_LICENSES_DIR)
    path = None
    if cache_dir is not False:
        from .cache import default_cache_dir

        folder = default_cache_dir() if cache_dir in (None, True) else Path(cache_dir)
        stamps = [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(licenses.glob("*"))
                  if p.is_file()] if licenses.is_dir() else []
        key = hashlib.sha256(repr((CORPUS_VERSION, sys.version, str(stdlib.resolve()), str(licenses.resolve()),
                                   stamps)).encode()).hexdigest()[:16]
        path = folder / "text" / f"corpus-{key}.txt"
        if path.is_file():
            try:
                return path.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                pass  # rebuilt below
    text = "\n\n".join(corpus_parts(stdlib, licenses).values())
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".corpus-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(text)
            os.replace(tmp, path)
        except OSError:
            pass  # a read-only cache only costs the few seconds again
    return text


def load_text(source: str = "pydoc", path: str | Path | None = None) -> str:
    """Read a text corpus without network access.

    Parameters
    ----------
    source : {"pydoc", "file", "jargon", "corpus"}
        See the module docstring.
    path : str or Path, optional
        The file of ``source="file"`` (required), or another copy of the Jargon File for ``source="jargon"``.

    Returns
    -------
    str
        The whole text (non-empty).

    Raises
    ------
    ValueError
        Unknown source, a missing ``path`` for ``source="file"``, an empty file or one that is not UTF-8.
    FileNotFoundError
        The file does not exist, ``jargon-text`` is not installed, or a part of the corpus is missing.
    """
    if source not in TEXT_SOURCES:
        raise ValueError(f"unknown text source {source!r}; valid: {', '.join(TEXT_SOURCES)}")
    if source in ("pydoc", "corpus"):
        if path is not None:
            raise ValueError(f"source={source!r} reads texts installed with Python and Debian and takes no path "
                             "(use source='file' for your own text)")
        return _pydoc_text() if source == "pydoc" else load_corpus()
    if source == "file":
        if path is None or str(path) == "":
            raise ValueError("source='file' needs path=<UTF-8 text file>")
        return _read_utf8(Path(path).expanduser())
    candidates = [Path(path).expanduser()] if path is not None else [Path(p) for p in JARGON_PATHS]
    for candidate in candidates:
        if candidate.is_file():
            return _read_utf8(candidate)
    where = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(f"the Jargon File was not found (looked at {where}); install it with "
                            "`apt install jargon-text`, or use source='file' with path=<your text file>")


class CharVocab:
    """The sorted set of characters of a text, with encoding to and decoding from integer ids.

    Parameters
    ----------
    chars : iterable of str
        Characters (duplicates are removed; the vocabulary is sorted by code point).

    Attributes
    ----------
    chars : tuple of str
        Character of each id.
    """

    def __init__(self, chars: Iterable[str]) -> None:
        unique = sorted(set(chars))
        if not unique:
            raise ValueError("CharVocab needs at least one character")
        bad = [c for c in unique if not isinstance(c, str) or len(c) != 1]
        if bad:
            raise TypeError(f"CharVocab takes single characters, got {bad[:5]!r}")
        self.chars: tuple[str, ...] = tuple(unique)
        self._index = {c: i for i, c in enumerate(self.chars)}

    @classmethod
    def from_text(cls, text: str) -> CharVocab:
        """The vocabulary of every character occurring in ``text``."""
        return cls(text)

    def __len__(self) -> int:
        return len(self.chars)

    def __contains__(self, char: object) -> bool:
        return char in self._index

    def __repr__(self) -> str:
        return f"CharVocab(size={len(self)})"

    def encode(self, text: str) -> np.ndarray:
        """Ids of the characters of ``text``, int64 ``(len(text),)``; unknown characters raise ``ValueError``."""
        try:
            return np.fromiter((self._index[c] for c in text), dtype=np.int64, count=len(text))
        except KeyError:
            unknown = sorted({c for c in text if c not in self._index})
            raise ValueError(f"{len(unknown)} character(s) not in the vocabulary: "
                             f"{''.join(unknown[:20])!r}") from None

    def decode(self, ids: Iterable[int] | np.ndarray | Tensor) -> str:
        """The text of a sequence of ids (1-D); ids outside ``0 .. len - 1`` raise ``ValueError``."""
        values = torch.as_tensor(ids).reshape(-1).tolist() if isinstance(ids, Tensor) else list(ids)
        n = len(self.chars)
        bad = [int(i) for i in values if not 0 <= int(i) < n]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the vocabulary (0 .. {n - 1})")
        return "".join(self.chars[int(i)] for i in values)


def split_text(text: str, val_fraction: float = 0.1, test_fraction: float = 0.0) -> tuple[str, str, str]:
    """Contiguous split ``text = train + val + test`` (test at the end, validation before it).

    The last ``test_fraction`` of the characters is the test text, the ``val_fraction`` before it the validation
    text. Deterministic (no shuffling: neighbouring characters are not independent samples). Returns
    ``(train, val, test)``; ``test`` is ``""`` when ``test_fraction`` is 0.
    """
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if isinstance(f, bool) or not 0.0 <= float(f) < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f!r}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    n = len(text)
    n_test = int(round(n * test_fraction))
    n_val = int(round(n * val_fraction))
    n_train = n - n_val - n_test
    if n_train < 2 or (val_fraction > 0 and n_val < 2) or (test_fraction > 0 and n_test < 2):
        raise ValueError(f"a text of {n} characters is too short for val_fraction={val_fraction}, "
                         f"test_fraction={test_fraction}")
    return text[:n_train], text[n_train:n_train + n_val], text[n_train + n_val:]


def _check_block(n_ids: int, block_size: int, what: str = "text") -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")
    if n_ids < block_size + 1:
        raise ValueError(f"the {what} has {n_ids} characters, fewer than block_size + 1 = {block_size + 1}")
    return n_ids - block_size  # number of valid window starts


def eval_starts(n_ids: int, block_size: int, count: int | None = None) -> np.ndarray:
    """Deterministic window starts for evaluation over a text of ``n_ids`` characters.

    ``count=None``: consecutive non-overlapping windows ``0, T, 2T, ...`` (every character but the last
    ``< T`` ones predicted once). ``count=k``: ``k`` starts evenly spaced over the text (first and last window
    included), fewer if the text has fewer distinct starts.
    """
    n_starts = _check_block(n_ids, block_size)
    if count is None:
        return np.arange(0, n_starts, block_size, dtype=np.int64)
    if isinstance(count, bool) or not isinstance(count, int) or count < 1:
        raise ValueError(f"count must be a positive int or None, got {count!r}")
    return np.unique(np.linspace(0, n_starts - 1, num=min(count, n_starts)).round().astype(np.int64))


class CharWindows(Dataset):
    """Windows of a sequence of character ids; item ``i`` is ``(x, y, domain)`` for the window at ``starts[i]``.

    Parameters
    ----------
    ids : array_like of int, shape (L,)
        The encoded text.
    block_size : int
        Window length ``T``.
    starts : array_like of int, optional
        Window starts (each in ``0 .. L - T - 1``); default: every start, item ``i`` = window at ``i``
        (to be drawn by a :class:`RandomWindowSampler`).

    Items are ``x`` int64 ``(T,)``, ``y = ids[s + 1 : s + T + 1]`` int64 ``(T,)`` and ``domain`` 0 (int64 scalar).
    """

    def __init__(self, ids: Sequence[int] | np.ndarray | Tensor, block_size: int,
                 starts: Sequence[int] | np.ndarray | None = None) -> None:
        self.ids = torch.as_tensor(np.asarray(ids), dtype=torch.int64).reshape(-1)
        self.block_size = block_size
        n_starts = _check_block(len(self.ids), block_size)
        if starts is None:
            self.starts = None
            self._len = n_starts
        else:
            self.starts = torch.as_tensor(np.asarray(starts, dtype=np.int64))
            if self.starts.ndim != 1 or len(self.starts) == 0:
                raise ValueError("starts must be a non-empty 1-D sequence of ints")
            if int(self.starts.min()) < 0 or int(self.starts.max()) >= n_starts:
                raise ValueError(f"window starts must lie in 0 .. {n_starts - 1} "
                                 f"(text of {len(self.ids)} characters, block_size {block_size})")
            self._len = len(self.starts)
        self._zero = torch.zeros((), dtype=torch.int64)

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, Tensor]:
        if not -self._len <= i < self._len:
            raise IndexError(f"window {i} out of range for {self._len} windows")
        s = int(self.starts[i]) if self.starts is not None else i % self._len
        chunk = self.ids[s:s + self.block_size + 1]
        return chunk[:-1], chunk[1:], self._zero


class RandomWindowSampler(Sampler[int]):
    """``num_samples`` window starts drawn uniformly (with replacement) from ``0 .. num_starts - 1``.

    The draw of epoch ``e`` comes from a generator seeded by ``(seed, e)`` (the training loop calls
    :meth:`set_epoch`), so a run resumed from a checkpoint sees the same windows as an uninterrupted one.
    """

    def __init__(self, num_starts: int, num_samples: int, seed: int = 0) -> None:
        for name, v in (("num_starts", num_starts), ("num_samples", num_samples)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.num_starts, self.num_samples, self.seed, self.epoch = num_starts, num_samples, int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randint(self.num_starts, (self.num_samples,), generator=g).tolist())

    def __len__(self) -> int:
        return self.num_samples
