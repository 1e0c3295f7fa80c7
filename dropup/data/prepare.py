"""Streaming corpus preparation: documents -> cleaned, de-duplicated, split per domain -> BPE -> token shards.

A prepared dataset is a folder:
    manifest.json                 format 2: per-domain document/character/token counts, the shard index, the hash of
                                  every file and of every token stream, the corpus hash, inputs and settings
    tokenizer.json                byte-level BPE (HF tokenizers), or the HF seed model's tokenizer
    <domain>.<side>.<NNNNN>.bin   uint16 (uint32 past 65,536 tokens) ids, documents joined by the end-of-text
                                  token; side is train or val. The shards of one (domain, side), in number order,
                                  concatenate into that split's token stream: `manifest["shards"]["ja.train"]` lists
                                  them with their token counts and sha256.
Format 1 (one <domain>.<side>.bin per split, no shard index) is still read. The corpus hash is taken over the
streams, not the files, so the same tokens give the same hash in either format.

The build runs in five steps inside <name>.partial/, each of which survives a kill: a rerun with the same inputs and
settings resumes at the step and chunk where it stopped (inputs are compared by size and mtime), and gives files
identical to an uninterrupted build. The folder is renamed to <name> when complete.
  1. scan      The main process reads the documents in order and cuts them into chunks of ~chunk_chars. Worker
               processes clean each document and return (128-bit content hash, characters, domain, split), which
               is appended to scan.bin (24 bytes per document); each chunk's document count then goes to
               scan-chunks.u32, which marks it done.
  2. plan      Exact de-duplication with bounded memory (`dropup.data.dedup`): the records are partitioned by hash
               into buckets on disk, each about dedup_bucket_records long (1 M: 32 MB); each bucket is sorted in
               memory and every repeat of a (domain, hash) after its first occurrence is marked. It costs 32
               bytes of scratch disk per document plus one byte of marks, and two sequential passes: 100 M
               documents take 3.3 GB of scratch and 100 buckets. Then the first max_chars_per_domain characters of each domain are kept (as if
               reading stopped there), each document's fate (dropped, train, val) goes to fate.u8, and chunks are
               grouped into shard groups of ~shard_chars kept characters. Scratch files are read in blocks, never
               memory-mapped whole.
  3. tokenizer The given tokenizer, or a BPE trained (in a forked child, whose memory goes when it exits) on a
               deterministic sample of the training documents: those whose content hash falls below
               tokenizer_sample_chars / (training characters), i.e. the whole split when it is smaller than the
               sample. The sample does not depend on document order or chunking. BPE memory grows with the sample.
  4. tokenize  Workers clean and encode each chunk's kept documents; the main process appends the ids to the
               current shard group's files, and a finished group, with its files' sha256, is appended to
               progress.jsonl. On resume finished groups are verified by hash and not redone.
  5. manifest  Stream and corpus hashes, counts; scratch files removed; rename.
Parallelism: `num_proc` worker processes (forked on Linux, one tokenizer thread each) with at most two chunks in flight per
worker, so peak memory depends on chunk_chars and num_proc, not on the corpus. With num_proc=1 everything runs in
this process and tokenizers uses its own threads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from dropup.data.corpus import EOT, MIN_DOC_CHARS, DataError, clean, sha256_file, train_tokenizer
from dropup.data.dedup import mark_duplicates
from dropup.data.workers import SCAN_RECORD, TOO_SHORT, TRAIN, VAL, Meter, chunked, ordered_map, scan_chunk, \
    tokenize_chunk, tokenizers_parallelism
from dropup.files import read_json, write_json_atomic
from dropup.schema import DEFAULT_CHUNK_CHARS, DEFAULT_SHARD_CHARS, DEFAULT_TOKENIZER_SAMPLE_CHARS

FORMAT = 2
SIDES = ("train", "val")


@dataclass(frozen=True)
class BuildSettings:
    """What determines the prepared files (vocab_size, val_fraction, max_chars_per_domain, tokenizer_sample_chars),
    and how the work is cut (the rest: they change the shard layout, never the token streams)."""

    domains: tuple[str, ...]
    vocab_size: int
    val_fraction: float
    max_chars_per_domain: int | None = None
    tokenizer_sample_chars: int | None = DEFAULT_TOKENIZER_SAMPLE_CHARS
    chunk_chars: int = DEFAULT_CHUNK_CHARS
    shard_chars: int = DEFAULT_SHARD_CHARS
    dedup_bucket_records: int = 1_000_000
    num_proc: int | None = None

    @property
    def processes(self) -> int:
        return max(1, self.num_proc or len(os.sched_getaffinity(0)))


def stream_names(domains) -> list[str]:
    return [f"{d}.{side}" for d in domains for side in SIDES]


# --- the build --------------------------------------------------------------------------------------------------


def _commit(path: Path, data: bytes) -> None:
    """Append a record that marks finished work (its own write, flushed: the unit a killed build keeps)."""
    with open(path, "ab") as f:
        f.write(data)


class Build:
    """One build folder (<name>.partial) and its resumable steps."""

    def __init__(self, out_dir: Path, documents, settings: BuildSettings, tokenizer_path: Path | None, log):
        self.out, self.documents, self.settings, self.log = Path(out_dir), documents, settings, log
        self.tokenizer_path = Path(tokenizer_path) if tokenizer_path else None
        self.tmp = self.out.with_name(self.out.name + ".partial")
        self.domains = list(settings.domains)
        self.streams = stream_names(self.domains)

    # -- resumption

    def identity(self) -> dict:
        tok = sha256_file(self.tokenizer_path) if self.tokenizer_path else None
        return {"format": FORMAT, "settings": asdict(self.settings) | {"num_proc": None},
                "inputs": self.documents.inputs(), "tokenizer": tok}

    def open(self) -> None:
        identity = self.identity()
        if self.tmp.is_dir():
            if read_json(self.tmp / "build.json") == json.loads(json.dumps(identity)):
                self.log(f"resuming the interrupted build in {self.tmp}")
                return
            self.log(f"{self.tmp} was left by a build of other inputs or settings: starting over")
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        write_json_atomic(self.tmp / "build.json", identity)

    def run(self) -> dict:
        self.open()
        chunk_docs = self.scan()
        plan = self.plan(chunk_docs)
        tokenizer = self.tokenizer(chunk_docs, plan)
        groups, stream_sha256 = self.tokenize(tokenizer, chunk_docs, plan)
        return self.finish(tokenizer, plan, groups, stream_sha256)

    # -- 1. scan

    def scan(self) -> list[int]:
        """Docs per chunk. scan.bin gets each chunk's records, then scan-chunks.u32 its count: a chunk counts as
        scanned once both are on disk (a record tail without its count is cut off on resume). Appends only, so the
        cost per chunk does not grow with the corpus."""
        counts_path, path = self.tmp / "scan-chunks.u32", self.tmp / "scan.bin"
        for file in (counts_path, path):
            file.touch()
        with open(counts_path, "r+b") as f:
            f.truncate(counts_path.stat().st_size // 4 * 4)
        done = np.fromfile(counts_path, dtype=np.uint32).tolist()
        if (self.tmp / "scan.done").is_file():
            return done
        with open(path, "r+b") as f:
            f.truncate(sum(done) * SCAN_RECORD.itemsize)
        s = self.settings
        chunks = chunked(self.documents, self.domains, s.chunk_chars)
        n_done = len(done)
        todo = ((c, s.val_fraction) for i, c in enumerate(chunks) if i >= n_done)
        with Meter("scan", None, self.log) as meter, open(path, "ab") as f:
            meter.docs = sum(done)
            for records in ordered_map(scan_chunk, todo, s.processes):
                f.write(records.tobytes())
                f.flush()
                _commit(counts_path, np.uint32(len(records)).tobytes())
                done.append(len(records))
                meter.advance(len(records), chars=int(records["chars"].sum()))
        (self.tmp / "scan.done").touch()
        return done

    def read(self, name: str, dtype, start: int, count: int) -> np.ndarray:
        """Items [start, start + count) of a scratch file, read (not memory-mapped: pages of a map stay resident)."""
        dtype = np.dtype(dtype)
        return np.fromfile(self.tmp / name, dtype=dtype, count=count, offset=start * dtype.itemsize)

    # -- 2. plan

    def plan(self, chunk_docs: list[int]) -> dict:
        plan = read_json(self.tmp / "plan.json")
        if plan is not None:
            return plan
        n = sum(chunk_docs)
        duplicates = mark_duplicates(self.tmp, n, self.settings.dedup_bucket_records)
        dup = np.memmap(self.tmp / "dup.u8", dtype=np.uint8, mode="r") if n else None
        limit = self.settings.max_chars_per_domain
        used = np.zeros(len(self.domains), dtype=np.int64)  # characters kept so far per domain
        counts = {s: {"documents": 0, "characters": 0} for s in self.streams}
        kept = np.zeros((len(chunk_docs), 2), dtype=np.int64)  # per chunk: documents and characters kept
        groups, group_first, group_chars, start, too_short = [], 0, 0, 0, 0
        with open(self.tmp / "fate.u8.tmp", "wb") as fate_file:
            for c, size in enumerate(chunk_docs):
                rec = self.read("scan.bin", SCAN_RECORD, start, size)
                chars = rec["chars"].astype(np.int64)
                too_short += int((rec["split"] == TOO_SHORT).sum())
                keep = (rec["split"] != TOO_SHORT) & (dup[start:start + size] == 0)
                fate = np.zeros(size, dtype=np.uint8)
                for d in range(len(self.domains)):
                    idx = np.flatnonzero(keep & (rec["domain"] == d))
                    if limit is not None:
                        before = used[d] + np.cumsum(chars[idx]) - chars[idx]
                        idx = idx[before < limit]  # the document that reaches the limit is the last one read
                    used[d] += int(chars[idx].sum())
                    fate[idx] = rec["split"][idx] + 1
                    for side, value in zip(SIDES, (TRAIN, VAL)):
                        mine = idx[fate[idx] == value]
                        counts[f"{self.domains[d]}.{side}"]["documents"] += int(mine.size)
                        counts[f"{self.domains[d]}.{side}"]["characters"] += int(chars[mine].sum())
                fate_file.write(fate.tobytes())
                kept[c] = int((fate > 0).sum()), int(chars[fate > 0].sum())
                group_chars += int(kept[c, 1])
                start += size
                if group_chars >= self.settings.shard_chars or c == len(chunk_docs) - 1:
                    groups.append([group_first, c + 1])
                    group_first, group_chars = c + 1, 0
        del dup
        self._check_counts(counts)
        kept.tofile(self.tmp / "kept.i64")
        os.replace(self.tmp / "fate.u8.tmp", self.tmp / "fate.u8")
        (self.tmp / "dup.u8").unlink(missing_ok=True)
        plan = {"chunks": len(chunk_docs), "documents": n, "too_short": too_short, "duplicates": duplicates,
                "streams": counts, "groups": groups}
        write_json_atomic(self.tmp / "plan.json", plan)
        total = sum(c["documents"] for c in counts.values())
        self.log(f"plan: {n:,} documents read, {too_short:,} under {MIN_DOC_CHARS} characters, "
                 f"{duplicates:,} exact duplicates, {total:,} kept in {len(groups)} shard group(s)")
        return plan

    def _check_counts(self, counts: dict) -> None:
        empty = [d for d in self.domains if not counts[f"{d}.train"]["documents"] + counts[f"{d}.val"]["documents"]]
        if empty:
            raise DataError(f"{self.documents.description} has no documents for domain(s) {empty}: add them, or set "
                            "data.domains")
        for d in self.domains:
            for side in SIDES:
                if not counts[f"{d}.{side}"]["documents"]:
                    raise DataError(f"domain {d!r} has no {side} documents after cleaning: give it more text "
                                    f"(at least a few documents of {MIN_DOC_CHARS}+ characters)")

    # -- 3. tokenizer

    def kept_documents(self, chunk_docs: list[int], select: Callable[..., np.ndarray]):
        """(chunk index, [(stream index, raw text)]) of the documents `select(chunk, start, count, fate)` marks in
        each chunk, re-read in order; reading stops after the last scanned chunk."""
        start = 0
        chunks = chunked(self.documents, self.domains, self.settings.chunk_chars)
        for c, (size, chunk) in enumerate(zip(chunk_docs, chunks)):
            if len(chunk) != size:
                raise DataError(f"{self.documents.description} changed while it was being prepared (chunk {c} has "
                                f"{len(chunk)} documents, {size} when scanned): rerun on unchanged inputs")
            fate = self.read("fate.u8", np.uint8, start, size)
            wanted = np.flatnonzero(select(c, start, size, fate))
            yield c, [(chunk[i][0] * 2 + int(fate[i]) - 1, chunk[i][1]) for i in wanted]
            start += size

    def tokenizer(self, chunk_docs: list[int], plan: dict):
        from tokenizers import Tokenizer

        path = self.tmp / "tokenizer.json"
        if path.is_file():
            return Tokenizer.from_file(str(path))
        if self.tokenizer_path is not None:
            tokenizer = Tokenizer.from_file(str(self.tokenizer_path))
            if tokenizer.token_to_id(EOT) is None:
                tokenizer.add_special_tokens([EOT])
            self._save_tokenizer(tokenizer, {"source": str(self.tokenizer_path)})
            return tokenizer
        self.in_child_process(self.train_bpe, chunk_docs, plan)
        return Tokenizer.from_file(str(path))

    def train_bpe(self, chunk_docs: list[int], plan: dict) -> None:
        """BPE on the training documents whose content hash falls below fraction * 2**64 (all of them when the
        split is smaller than tokenizer_sample_chars): a sample independent of order and chunking."""
        train_chars = sum(plan["streams"][f"{d}.train"]["characters"] for d in self.domains)
        budget = self.settings.tokenizer_sample_chars
        fraction = 1.0 if budget is None or budget >= train_chars else budget / train_chars
        threshold = np.uint64(min(int(fraction * 2**64), 2**64 - 1))

        def picked(chunk, start, count, fate):
            return (fate == TRAIN) & ((fraction >= 1.0) | (self.read("scan.bin", SCAN_RECORD, start, count)["h0"]
                                                          < threshold))
        sample = {"documents": 0, "characters": 0}

        def texts():
            with Meter("tokenizer sample", None, self.log) as meter:
                for _, docs in self.kept_documents(chunk_docs, picked):
                    for _, text in docs:
                        doc = clean(text)
                        sample["documents"] += 1
                        sample["characters"] += len(doc)
                        meter.advance(1, chars=len(doc))
                        yield doc

        self.log(f"training a {self.settings.vocab_size}-token BPE on "
                 + ("the whole training split" if fraction >= 1.0 else f"a {fraction:.2%} sample of it"))
        tokenizer = train_tokenizer(texts(), self.settings.vocab_size)
        self._save_tokenizer(tokenizer, {"sample_fraction": fraction, **sample})

    def in_child_process(self, step: Callable, *args) -> None:
        """Run a step in a forked child where there is fork: BPE training's memory (it grows with the sample) is
        returned when the child exits, instead of staying in this process and in every worker forked after it."""
        import multiprocessing

        if "fork" not in multiprocessing.get_all_start_methods():
            step(*args)
            return
        error = self.tmp / "step-error.txt"
        error.unlink(missing_ok=True)

        def run():
            code = 0
            try:
                step(*args)
            except BaseException as err:  # noqa: BLE001 -- reported to the parent, which raises it
                error.write_text(f"{type(err).__name__}\n{err}")
                code = 1
            os._exit(code)

        with tokenizers_parallelism(None):  # the child trains on all cores
            child = multiprocessing.get_context("fork").Process(target=run, name=step.__name__)
            child.start()
            child.join()
        if error.is_file():
            kind, message = error.read_text().split("\n", 1)
            error.unlink()
            raise (DataError if kind == "DataError" else RuntimeError)(message)
        if child.exitcode != 0:
            raise RuntimeError(f"{step.__name__} died (exit code {child.exitcode}): if the machine ran out of "
                               "memory, lower data.tokenizer_sample_chars (BPE memory grows with the sample)")

    def _save_tokenizer(self, tokenizer, info: dict) -> None:
        write_json_atomic(self.tmp / "tokenizer-info.json", info)
        tokenizer.save(str(self.tmp / "tokenizer.json.tmp"))
        os.replace(self.tmp / "tokenizer.json.tmp", self.tmp / "tokenizer.json")

    # -- 4. tokenize

    def tokenize(self, tokenizer, chunk_docs: list[int], plan: dict) -> tuple[dict, dict]:
        """({group: {stream: file entry}}, {stream: sha256 of its whole token stream}). A finished group is one line
        of progress.jsonl (appended, so the cost per group does not grow with the corpus); on resume its files are
        verified by hash, and redone if they differ. Stream hashes are fed in group order as ids are written; only
        groups finished by an earlier run are read back for them."""
        progress_path = self.tmp / "progress.jsonl"
        progress_path.touch()
        finished = {}
        for line in progress_path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # a line cut short by a kill: that group is not finished
            finished[entry["group"]] = entry["files"]
        for g, files in list(finished.items()):
            if not all((self.tmp / f["file"]).is_file() and sha256_file(self.tmp / f["file"]) == f["sha256"]
                       for f in files.values()):
                self.log(f"shard group {g}: files differ from their recorded hashes, redoing it")
                del finished[g]
        with open(progress_path, "w") as f:  # what survived verification, whole lines only
            f.writelines(json.dumps({"group": g, "files": files}) + "\n" for g, files in finished.items())
        if finished:
            self.log(f"{len(finished)} of {len(plan['groups'])} shard groups already finished and verified")
        streams = {s: hashlib.sha256() for s in self.streams}
        hashed = [0]  # groups < hashed[0] are in `streams`

        def hash_finished_before(g: int) -> None:
            for earlier in range(hashed[0], g):
                for s, entry in finished[earlier].items():
                    with open(self.tmp / entry["file"], "rb") as f:
                        for block in iter(lambda: f.read(1 << 22), b""):
                            streams[s].update(block)
            hashed[0] = max(hashed[0], g)

        chunk_group = {c: g for g, (a, b) in enumerate(plan["groups"]) for c in range(a, b)}
        todo_chunks = {c for c, g in chunk_group.items() if g not in finished}
        kept = np.fromfile(self.tmp / "kept.i64", dtype=np.int64).reshape(-1, 2)
        wanted = lambda c, start, count, fate: (fate > 0) & (c in todo_chunks)  # noqa: E731
        work = ((docs, len(self.streams)) for c, docs in self.kept_documents(chunk_docs, wanted) if c in todo_chunks)
        open_files: dict[int, tuple] = {}
        todo = iter(sorted(todo_chunks))
        with Meter("tokenize", int(kept[sorted(todo_chunks), 0].sum()), self.log) as meter:
            for tokens in ordered_map(tokenize_chunk, work, self.settings.processes, tokenizer.to_str()):
                c = next(todo)
                g = chunk_group[c]
                hash_finished_before(g)
                for s, ids in enumerate(tokens):
                    if ids is None:
                        continue
                    if s not in open_files:
                        name = f"{self.streams[s]}.{g:05d}.bin"
                        open_files[s] = (name, open(self.tmp / name, "wb"), hashlib.sha256(), [0])
                    name, f, digest, count = open_files[s]
                    data = ids.tobytes()
                    f.write(data)
                    digest.update(data)
                    streams[self.streams[s]].update(data)
                    count[0] += ids.size
                meter.advance(int(kept[c, 0]), chars=int(kept[c, 1]),
                              tokens=sum(t.size for t in tokens if t is not None))
                if c == plan["groups"][g][1] - 1:
                    files = {}
                    for s, (name, f, digest, count) in sorted(open_files.items()):
                        f.close()
                        files[self.streams[s]] = {"file": name, "tokens": count[0], "sha256": digest.hexdigest()}
                    open_files.clear()
                    finished[g] = files
                    hashed[0] = g + 1
                    _commit(progress_path, (json.dumps({"group": g, "files": files}) + "\n").encode())
        hash_finished_before(len(plan["groups"]))
        return finished, {s: digest.hexdigest() for s, digest in streams.items()}

    # -- 5. manifest

    def finish(self, tokenizer, plan: dict, groups: dict, stream_sha256: dict) -> dict:
        shards = {s: [] for s in self.streams}
        for g in range(len(plan["groups"])):
            for s, entry in groups[g].items():
                shards[s].append(entry)
        streams = {s: {"tokens": sum(e["tokens"] for e in entries), "sha256": stream_sha256[s]}
                   for s, entries in shards.items()}
        domains = {d: {side: {**plan["streams"][f"{d}.{side}"], "tokens": streams[f"{d}.{side}"]["tokens"]}
                       for side in SIDES} for d in self.domains}
        files = {"tokenizer.json": sha256_file(self.tmp / "tokenizer.json")}
        files.update({e["file"]: e["sha256"] for entries in shards.values() for e in entries})
        manifest = {
            "format": FORMAT,
            "dtype": "uint16" if tokenizer.get_vocab_size() <= 65536 else "uint32",
            "vocab_size": tokenizer.get_vocab_size(),
            "eot_id": tokenizer.token_to_id(EOT),
            "domains": domains,
            "sources": self.documents.provenance,
            "inputs": self.documents.inputs(),
            "settings": {k: v for k, v in asdict(self.settings).items() if k != "num_proc"},
            "scan": {k: plan[k] for k in ("chunks", "documents", "too_short", "duplicates")},
            "shard_groups": plan["groups"],  # group g: chunks [a, b) of the scan; its files are <stream>.<g>.bin
            "tokenizer": read_json(self.tmp / "tokenizer-info.json"),
            "shards": shards,
            "streams": streams,
            "files": files,
            "tokenizer_hash": files["tokenizer.json"],
            "corpus_hash": corpus_hash({s: v["sha256"] for s, v in streams.items()}),
        }
        for scratch in ("scan.bin", "scan-chunks.u32", "scan.done", "fate.u8", "kept.i64", "plan.json",
                        "progress.jsonl", "build.json", "tokenizer-info.json"):
            (self.tmp / scratch).unlink(missing_ok=True)
        write_json_atomic(self.tmp / "manifest.json", manifest)
        shutil.rmtree(self.out, ignore_errors=True)
        self.tmp.rename(self.out)
        return json.loads((self.out / "manifest.json").read_text())


def corpus_hash(stream_sha256: dict[str, str]) -> str:
    """One hash of all token streams. Keyed by the format-1 file names, so the same tokens hash the same in both."""
    return hashlib.sha256(json.dumps({f"{s}.bin": h for s, h in stream_sha256.items()}, sort_keys=True)
                          .encode()).hexdigest()


def prepare(out_dir: Path, documents, settings: BuildSettings, tokenizer_path: Path | None = None,
            log: Callable[[str], None] = print) -> dict:
    """Build (or resume building) the prepared dataset at `out_dir` from `documents` (a reader of
    dropup.data.corpus). Returns the manifest. Bad input raises DataError and leaves no partial build behind."""
    build = Build(out_dir, documents, settings, tokenizer_path, log)
    try:
        return build.run()
    except DataError:
        shutil.rmtree(build.tmp, ignore_errors=True)
        raise

