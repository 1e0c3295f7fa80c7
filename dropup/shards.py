"""Streaming safetensors I/O for checkpoints larger than memory (used by `dropup-upcycle`).

Reading: `CheckpointReader` is a lazy, read-only mapping from tensor names (ours, or any the caller picks) to the
tensors of one checkpoint (one or several `*.safetensors` files). Shapes and dtypes come from the file headers; a
tensor's bytes are read only when it is looked up, with `pread` rather than `mmap`, so the process never maps a
whole input file. A name may stand for a whole stored tensor (`Stored`) or for rows of stored tensors
(`Assembled`: a part of a fused tensor such as Phi-3's q|k|v, read with safetensors' `get_slice`, never the whole
fused tensor; or per-expert matrices stacked into one). Which names mean what is the family's tensor mapping
(`dropup.families.mapping`). The reader records which names were read, for the converter's strict accounting.

Writing: `ShardWriter` writes one safetensors file whose tensor list is planned in advance. Because every name,
shape and dtype is known before any value is computed, the header goes first and each tensor's bytes are appended
as soon as the tensor exists -- no shard is ever assembled in memory (safetensors' own `save_file` needs the whole
dict, and copies it once more to serialize). The file is built under a temporary name, past the page cache where
the file system allows (`DirectFile`), and renamed into place after an fsync, so a file with the final name is
always complete. `write_safetensors` uses it to write the very bytes safetensors' `save_file` would (its tensor
order and header), one tensor in memory at a time: a run's final weights, the consolidation of a sharded checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from dropup.config import ConfigError

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# every dtype safetensors stores, in the order its `save_file` lays tensors out: by its dtype enum, descending
# (widest first), then by name
SAVE_ORDER = {torch.uint64: "U64", torch.int64: "I64", torch.float64: "F64", torch.float32: "F32", torch.uint32: "U32",
              torch.int32: "I32", torch.bfloat16: "BF16", torch.float16: "F16", torch.uint16: "U16", torch.int16: "I16",
              torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
DTYPE_NAMES = {**SAVE_ORDER, **{v: k for k, v in DTYPES.items()}}
HF_METADATA = {"format": "pt"}  # what transformers' save_pretrained (and our converter) put in the header
PARTIAL_SUFFIX = ".partial"
INDEX = "model.safetensors.index.json"  # a sharded checkpoint's weight map
PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")  # weights dropup never unpickles
_HEADER_LIMIT = 100 * 1024 * 1024  # the format's own limit on the JSON header


def _open(path: Path):
    """safe_open with pread (no mmap of the whole file); older safetensors without `backend` fall back to mmap."""
    try:
        return safe_open(str(path), framework="pt", backend="pread")
    except TypeError:
        return safe_open(str(path), framework="pt")


def file_tensors(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """name -> (shape, dtype) of every tensor in one safetensors file, from its header (no tensor data is read).

    safetensors validates the header against the file size, so a truncated or corrupt file fails here."""
    try:
        with _open(path) as f:
            out = {}
            for name in f.keys():
                piece = f.get_slice(name)
                dtype = piece.get_dtype()
                if dtype not in DTYPES:
                    raise ConfigError(f"{path}: tensor {name} has dtype {dtype}; only floating-point weights "
                                      f"({', '.join(DTYPES)}) can be upcycled")
                out[name] = (tuple(piece.get_shape()), DTYPES[dtype])
            return out
    except SafetensorError as err:
        raise ConfigError(f"{path} is not a readable safetensors file ({err}): it is truncated or corrupt; "
                          "download or copy it again") from None


@dataclass(frozen=True)
class Stored:
    """Where one tensor lives: its file, its name there, and its shape and dtype (from the header)."""

    path: Path
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) of a stored tensor seen as a matrix: leading dimensions flattened, the last one the row
    (a vector is a column of one-element rows). A fused tensor's part is a range of its rows."""

    stored: Stored
    start: int
    stop: int


@dataclass(frozen=True)
class Assembled:
    """One tensor made of stored rows: the pieces' rows concatenated in order, reshaped to `shape`, then
    `transform` (elementwise) applied."""

    pieces: tuple[Rows, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None

    @property
    def paths(self) -> set[Path]:
        return {piece.stored.path for piece in self.pieces}


def paths_of(entry: Stored | Assembled) -> set[Path]:
    """The files a reader entry reads from."""
    return entry.paths if isinstance(entry, Assembled) else {entry.path}


def _read_rows(piece: Rows) -> torch.Tensor:
    """The rows of one piece as a (rows, width) matrix, reading only the bytes they occupy where the layout allows
    (a row range of a matrix or vector; whole leading blocks, or a range inside one block, of a stacked tensor)."""
    stored = piece.stored
    shape = stored.shape
    width = shape[-1] if len(shape) > 1 else 1
    with _open(stored.path) as f:
        sliced = f.get_slice(stored.name)
        if len(shape) <= 2:
            return sliced[piece.start: piece.stop].reshape(-1, width)
        block = 1
        for size in shape[1:-1]:
            block *= size
        first, last = piece.start // block, (piece.stop - 1) // block
        if piece.start % block == 0 and piece.stop % block == 0:
            return sliced[first: last + 1].reshape(-1, width)
        if first == last and len(shape) == 3:
            return sliced[first: first + 1, piece.start % block: piece.stop - first * block].reshape(-1, width)
        # a range across blocks of a stacked tensor: no mapping produces one, but it is still read correctly
        return f.get_tensor(stored.name).reshape(-1, width)[piece.start: piece.stop]


def read_entry(entry: Stored | Assembled) -> torch.Tensor:
    """The tensor a reader entry stands for (safetensors errors pass through to the caller)."""
    if isinstance(entry, Stored):
        with _open(entry.path) as f:
            return f.get_tensor(entry.name)
    parts = [_read_rows(piece) for piece in entry.pieces]
    tensor = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(entry.shape)
    return entry.transform(tensor) if entry.transform is not None else tensor


def scan(files: list[Path]) -> dict[str, Stored]:
    """Every tensor of a checkpoint made of `files`, by its stored name; a name in two files is an error."""
    found: dict[str, Stored] = {}
    for path in files:
        for name, (shape, dtype) in file_tensors(path).items():
            if name in found:
                raise ConfigError(f"tensor {name} is stored twice, in {found[name].path.name} and {path.name}: "
                                  "the checkpoint is inconsistent; re-save it")
            found[name] = Stored(path, name, shape, dtype)
    return found


class CheckpointReader(Mapping[str, torch.Tensor]):
    """Lazily read tensors of one checkpoint under the names the caller chose (`entries`: name -> Stored, or
    Assembled for rows of stored tensors).

    `consumed` collects the names read so far; it is filled on the converter's main thread and copied from its
    writer thread (`consumed_names`), hence the lock."""

    def __init__(self, entries: Mapping[str, Stored | Assembled]):
        self._entries = dict(entries)
        self._lock = threading.Lock()
        self._consumed: set[str] = set()

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        entry = self._entries[name]
        return entry.shape, entry.dtype

    def consumed_names(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._consumed)

    def __getitem__(self, name: str) -> torch.Tensor:
        entry = self._entries[name]
        try:
            tensor = read_entry(entry)
        except SafetensorError as err:
            where = ", ".join(sorted(str(p) for p in paths_of(entry)))
            raise ConfigError(f"{where}: reading tensor {name} failed ({err}): the file changed during the "
                              "conversion or is corrupt") from None
        with self._lock:
            self._consumed.add(name)
        return tensor

    def __contains__(self, name: object) -> bool:  # Mapping's default would read the tensor to find out
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class PlanError(RuntimeError):
    """A shard received something other than its next planned tensor: the output would be wrong or incomplete."""


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of an output file, known before its values are: its name there, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        count = 1
        for size in self.shape:
            count *= size
        return count * torch.empty((), dtype=self.dtype).element_size()


def header_bytes(tensors: list[PlannedTensor], metadata: dict | None = HF_METADATA) -> bytes:
    """The safetensors header of a file holding `tensors` in this order (8-byte length, JSON, space padding);
    `metadata` None: no `__metadata__` entry (what `save_file` writes without metadata)."""
    header: dict = {} if metadata is None else {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()  # as safetensors' serializer
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (little-endian, as safetensors stores it)."""
    return memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def digest_of(header: bytes, tensor_digests: list[str]) -> str:
    """A shard's checksum: sha256 over its header and its tensors' sha256 digests (so each byte is hashed once)."""
    h = hashlib.sha256(header)
    for d in tensor_digests:
        h.update(bytes.fromhex(d))
    return h.hexdigest()


class DirectFile:
    """A file written sequentially past the page cache (O_DIRECT), with a buffered fallback.

    Why: on this project's virtual machines a buffered write costs about 2 s of kernel CPU per GB (5.4 GB: 11 s
    of system time, 0.45 GB/s), a direct one about 0.1 s (2.1 GB/s) -- and that CPU is what the init math needs.
    It also keeps tens of GB of output from crowding memory as page cache. O_DIRECT wants aligned memory, offsets
    and lengths, so bytes are staged in a page-aligned buffer and written in whole blocks; the last block is
    padded and the file truncated to its true length. Where the file system refuses O_DIRECT (tmpfs), or with
    `direct=False`, it is an ordinary buffered file."""

    ALIGN = 4096
    STAGE = 16 << 20  # a multiple of ALIGN

    def __init__(self, path: Path, direct: bool = True):
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
        self.direct = direct and hasattr(os, "O_DIRECT")
        try:
            self._fd = os.open(path, flags | (os.O_DIRECT if self.direct else 0), 0o644)
        except OSError:
            if not self.direct:
                raise
            self.direct = False
            self._fd = os.open(path, flags, 0o644)
        self._stage = mmap.mmap(-1, self.STAGE) if self.direct else None
        self._used = 0
        self._size = 0

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        if not self.direct:
            self._write_all(data)
            return
        stage = memoryview(self._stage)
        while data:
            n = min(len(data), self.STAGE - self._used)
            stage[self._used: self._used + n] = data[:n]
            self._used, data = self._used + n, data[n:]
            if self._used == self.STAGE:
                self._write_all(stage)
                self._used = 0
        stage.release()

    def close(self, sync: bool) -> None:
        """Write the staged tail (padded, then truncated back), fsync if asked, close."""
        try:
            if self.direct and self._used:
                padded = -(-self._used // self.ALIGN) * self.ALIGN
                stage = memoryview(self._stage)
                stage[self._used: padded] = bytes(padded - self._used)
                true_size = self._size + self._used
                self._write_all(stage[:padded])
                stage.release()
                os.ftruncate(self._fd, true_size)
                self._used = 0
            if sync:
                os.fsync(self._fd)
        finally:
            os.close(self._fd)
            if self._stage is not None:
                self._stage.close()

    def _write_all(self, view: memoryview) -> None:
        while view:
            n = os.write(self._fd, view)
            self._size += n
            view = view[n:]


class ShardWriter:
    """Writes the planned `tensors` to `path` in order: header first, each tensor's bytes as they arrive."""

    def __init__(self, path: Path, tensors: list[PlannedTensor], direct: bool = True,
                 metadata: dict | None = HF_METADATA, hashed: bool = True):
        self.path = Path(path)
        self.tensors = tensors
        self.partial = self.path.with_name(self.path.name + PARTIAL_SUFFIX)
        self.header = header_bytes(tensors, metadata)
        self.hashed = hashed  # False: no sha256 per tensor (the digests are empty)
        self.digests: list[str] = []
        self._file = DirectFile(self.partial, direct)
        self._file.write(self.header)

    @property
    def done(self) -> bool:
        return len(self.digests) == len(self.tensors)

    def write(self, name: str, tensor: torch.Tensor) -> str:
        """Append the next planned tensor; anything out of plan (name, shape, dtype) is an error."""
        if self.done:
            raise PlanError(f"{self.path.name}: got {name} after its last planned tensor")
        want = self.tensors[len(self.digests)]
        if (name, tuple(tensor.shape), tensor.dtype) != (want.name, want.shape, want.dtype):
            raise PlanError(f"{self.path.name}: the next planned tensor is {want.name} {want.shape} {want.dtype}, "
                            f"but {name} {tuple(tensor.shape)} {tensor.dtype} came: an output tensor was never "
                            "produced or changed shape (a bug); the output is not marked complete")
        data = tensor_bytes(tensor)
        self.digests.append(hashlib.sha256(data).hexdigest() if self.hashed else "")
        self._file.write(data)
        return self.digests[-1]

    def finish(self) -> str:
        """fsync, rename into place; returns the shard's checksum (`digest_of`)."""
        if not self.done:
            missing = self.tensors[len(self.digests)].name
            raise PlanError(f"{self.path.name}: tensor {missing} was never written")
        self._file.close(sync=True)
        os.replace(self.partial, self.path)
        fsync_dir(self.path.parent)
        return digest_of(self.header, self.digests)

    def abandon(self) -> None:
        """Close without finishing (the .partial file stays; a resumed run rewrites it)."""
        self._file.close(sync=False)


def save_file_order(metas: Mapping[str, tuple[tuple[int, ...], torch.dtype]]) -> list[PlannedTensor]:
    """name -> (shape, dtype) as the tensors of the file safetensors' `save_file` writes, in its order."""
    order = list(SAVE_ORDER)
    return [PlannedTensor(name, tuple(shape), dtype)
            for name, (shape, dtype) in sorted(metas.items(), key=lambda kv: (order.index(kv[1][1]), kv[0]))]


def write_safetensors(path: Path, metas: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      tensor_of: Callable[[str], torch.Tensor], metadata: dict | None = None,
                      direct: bool = True) -> Path:
    """Write `path` with the bytes `save_file({name: tensor_of(name)}, path, metadata)` writes, asking `tensor_of`
    for each tensor only when its turn comes (in `save_file_order`), so one tensor is held at a time, not the
    file. Written under a temporary name, fsynced and renamed: a file with the final name is complete."""
    writer = ShardWriter(path, save_file_order(metas), direct=direct, metadata=metadata, hashed=False)
    try:
        for planned in writer.tensors:
            writer.write(planned.name, tensor_of(planned.name))
        writer.finish()
    except BaseException:
        with contextlib.suppress(OSError):  # closed already if the rename failed
            writer.abandon()
        writer.partial.unlink(missing_ok=True)
        raise
    return Path(path)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_digests(path: Path, chunk: int = 64 << 20) -> tuple[str, dict[str, str]]:
    """(shard checksum, name -> sha256) of a written safetensors file, re-read from disk (resume check)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > _HEADER_LIMIT:
            raise ValueError(f"{path}: header length {length} is not plausible")
        raw = f.read(length)
        entries = {k: v for k, v in json.loads(raw).items() if k != "__metadata__"}
        digests = {}
        for name, entry in sorted(entries.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            begin, end = entry["data_offsets"]
            f.seek(8 + length + begin)
            h, left = hashlib.sha256(), end - begin
            while left:
                block = f.read(min(chunk, left))
                if not block:
                    raise ValueError(f"{path} is truncated")
                h.update(block)
                left -= len(block)
            digests[name] = h.hexdigest()
    order = sorted(entries, key=lambda n: entries[n]["data_offsets"][0])
    return digest_of(struct.pack("<Q", length) + raw, [digests[n] for n in order]), digests


def atomic_write(path: Path, data: str | bytes) -> None:
    """Write a small file under a temporary name, fsync, rename: readers see the old file or the new one."""
    tmp = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(tmp, "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --- Hugging Face directories ---------------------------------------------------------------------------------

def hf_weight_files(path: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files of an HF directory and its index's weight map (None when unsharded)."""
    index = path / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        except (ValueError, KeyError, TypeError, AttributeError) as err:
            raise ConfigError(f"{index} is not a safetensors index ({err}): re-save the model") from None
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise ConfigError(f"{path}: shard {missing[0]} listed in {INDEX} is missing: copy the complete "
                              "checkpoint (all shards)")
        return [path / f for f in files], weight_map
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"], None
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, None
    if any(next(path.glob(pattern), None) for pattern in PICKLED):
        raise ConfigError(f"{path} holds only pickled weights (.bin/.pt), which dropup never unpickles: re-save "
                          "the model with safetensors, e.g. model.save_pretrained(dir, safe_serialization=True)")
    raise ConfigError(f"{path} has no *.safetensors weights")


def scan_hf_dir(path: Path) -> dict:
    """The tensors of an HF directory (HF name -> shards.Stored), read through its index where it has one, so a
    stray copy or adapter file beside the shards is never merged in; the index and the shards must agree."""
    files, weight_map = hf_weight_files(path)
    stored = scan(files)
    if weight_map is not None:
        for name, entry in stored.items():
            if weight_map.get(name) != entry.path.name:
                raise ConfigError(f"{path}: tensor {name} is in {entry.path.name} but {INDEX} says "
                                  f"{weight_map.get(name)}: the checkpoint is inconsistent; re-save it")
        absent = sorted(set(weight_map) - set(stored))
        if absent:
            raise ConfigError(f"{path}: tensor {absent[0]} listed in {INDEX} is in none of the shards")
    return stored
