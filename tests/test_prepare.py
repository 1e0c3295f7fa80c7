"""The streaming corpus build (dropup.data.prepare): the same tokens as the in-memory definition, however the work is
cut; exact de-duplication in buckets; a deterministic tokenizer sample; resume after a kill; every input format and
every bad input."""

import gzip
import json
import random
import subprocess
import sys
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from dropup.data import TokenData, ensure_prepared
from dropup.data.corpus import (EOT, MIN_DOC_CHARS, DataError, HFDiskDocuments, JsonlDocuments, MemoryDocuments,
                                clean, content_hash, is_val, train_tokenizer)
from dropup.data.loader import TokenStream, split_files
from dropup.data.prepare import SIDES, Build, BuildSettings, prepare

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "corpus.jsonl"
DOMAINS = ("ja", "en", "code")
quiet = lambda message: None  # noqa: E731


def streams(path: Path) -> dict[str, np.ndarray]:
    """Every split's whole token stream, as the loader reads it (either folder format)."""
    manifest = json.loads((path / "manifest.json").read_text())
    out = {}
    for domain, side in ((d, side) for d in manifest["domains"] for side in SIDES):
        tokens = TokenStream(split_files(path, manifest, domain, side), np.dtype(manifest["dtype"]))
        out[f"{domain}.{side}"] = tokens.window(0, tokens.size)
    return out


def saved_tokenizer(path: Path) -> str:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(path / "tokenizer.json")).to_str()


def reference(documents: dict[str, list[str]], vocab_size: int, val_fraction: float, max_chars=None):
    """The definition, in memory: per domain, clean, drop short documents and exact repeats, stop once max_chars
    characters were kept; BPE on all training documents; each document's ids followed by EOT."""
    splits = {}
    for domain, docs in documents.items():
        seen, total, out = set(), 0, {"train": [], "val": []}
        for raw in docs:
            doc = clean(raw)
            if len(doc) < MIN_DOC_CHARS or doc in seen:
                continue
            seen.add(doc)
            out["val" if is_val(doc, val_fraction) else "train"].append(doc)
            total += len(doc)
            if max_chars is not None and total >= max_chars:
                break
        splits[domain] = out
    tokenizer = train_tokenizer([d for s in splits.values() for d in s["train"]], vocab_size)
    eot = tokenizer.token_to_id(EOT)
    return tokenizer, {f"{d}.{side}": np.array([t for enc in tokenizer.encode_batch(s[side]) for t in enc.ids + [eot]],
                                               dtype=np.uint16)
                       for d, s in splits.items() for side in SIDES}


def fixture_documents() -> dict[str, list[str]]:
    docs = {d: [] for d in DOMAINS}
    for line in FIXTURE.read_text().splitlines():
        record = json.loads(line)
        docs[record["domain"]].append(record["text"])
    return docs


def corpus_with_repeats() -> dict[str, list[str]]:
    """The fixture with repeats far apart (other chunks, other buckets), a document shared by two domains, short
    documents, and \\r\\n and control-character variants that are repeats only once cleaned."""
    docs = fixture_documents()
    rng = random.Random(0)
    for domain in DOMAINS:
        originals = list(docs[domain])
        for _ in range(40):
            repeat = rng.choice(originals)
            docs[domain].insert(rng.randrange(len(docs[domain]) + 1), rng.choice([
                repeat, repeat.replace("\n", "\r\n"), repeat + "\x00\x07  ", "short one"]))
    docs["en"].append(docs["ja"][3])  # a repeat across domains is kept in both
    return docs


def test_clean_equals_its_per_character_definition():
    """clean() skips the per-character walk when a C-speed check finds no control character; that check must not
    miss one hidden next to newlines, tabs or Unicode spaces (which it masks) on any random string."""
    def definition(text):
        text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
        text = "".join(ch for ch in text if ch in "\n\t" or unicodedata.category(ch)[0] != "C")
        return "\n".join(line.rstrip() for line in text.split("\n")).strip()

    rng = random.Random(0)
    pool = [0x3000, 0xA0, 0x2028, 0x2029, 0x85, 0x200B, 0xFEFF, 0x0301, 0xE000, 0x10FFFF, 9, 10, 13, 32, 0x7F, 0x0B]
    for _ in range(3000):
        text = "".join(chr(rng.choice([rng.randrange(0x20, 0x3100), rng.randrange(0, 0x110000), rng.choice(pool)]))
                       for _ in range(rng.randrange(0, 40)))
        assert clean(text) == definition(text), ascii(text)
    assert clean("a\u3000b\x00") == "a\u3000b"  # masked space and a control character together


@pytest.mark.parametrize("chunk_chars,shard_chars,num_proc,buckets", [
    (10**9, 10**9, 1, 10**6),   # one chunk, one shard, one bucket
    (8_000, 10_000, 2, 64),    # many chunks on two worker processes, several shard groups and buckets
])
def test_streams_equal_the_in_memory_definition(tmp_path, chunk_chars, shard_chars, num_proc, buckets):
    docs = corpus_with_repeats()
    max_chars = 30_000  # cuts every domain mid-stream
    tokenizer, expected = reference(docs, 512, 0.1, max_chars)
    settings = BuildSettings(domains=DOMAINS, vocab_size=512, val_fraction=0.1, max_chars_per_domain=max_chars,
                             chunk_chars=chunk_chars, shard_chars=shard_chars, num_proc=num_proc,
                             dedup_bucket_records=buckets)
    manifest = prepare(tmp_path / "ds", MemoryDocuments(docs), settings, log=quiet)
    assert saved_tokenizer(tmp_path / "ds") == tokenizer.to_str()
    got = streams(tmp_path / "ds")
    assert got.keys() == expected.keys()
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert manifest["scan"]["duplicates"] > 50 and manifest["scan"]["too_short"] > 3
    for domain in DOMAINS:  # the limit really cut them
        kept = sum(manifest["domains"][domain][side]["characters"] for side in SIDES)
        available = sum(len(d) for d in {clean(x) for x in docs[domain]} if len(d) >= MIN_DOC_CHARS)
        assert max_chars <= kept < available
    if chunk_chars < 10**9:
        assert max(len(v) for v in manifest["shards"].values()) > 1  # the split really was cut into shards


def test_fixture_corpus_hash_is_the_same_whatever_the_cut(tmp_path):
    hashes = set()
    for i, (chunk, procs) in enumerate([(10**9, 1), (5_000, 2), (50_000, 1)]):
        settings = BuildSettings(domains=DOMAINS, vocab_size=512, val_fraction=0.05, chunk_chars=chunk,
                                 shard_chars=30_000, num_proc=procs)
        hashes.add(prepare(tmp_path / str(i), JsonlDocuments(FIXTURE, DOMAINS), settings, log=quiet)["corpus_hash"])
    assert len(hashes) == 1


def test_tokenizer_sample_is_a_deterministic_hash_sample(tmp_path):
    """A sample of ~30% of the training characters, chosen by content hash: the same whatever the document order,
    and exactly the documents the hash rule names (not, say, the first 30% read)."""
    docs = fixture_documents()
    unique = {(domain, clean(x)) for domain, v in docs.items() for x in v}
    train = [d for _, d in unique if len(d) >= MIN_DOC_CHARS and not is_val(d, 0.05)]
    train_chars = sum(map(len, train))
    settings = BuildSettings(domains=DOMAINS, vocab_size=400, val_fraction=0.05,
                             tokenizer_sample_chars=int(0.3 * train_chars))
    forward = prepare(tmp_path / "f", MemoryDocuments(docs), settings, log=quiet)
    prepare(tmp_path / "b", MemoryDocuments({d: v[::-1] for d, v in reversed(docs.items())}), settings, log=quiet)
    sample = forward["tokenizer"]
    assert 0.2 < sample["characters"] / train_chars < 0.4 and sample["sample_fraction"] == pytest.approx(0.3, 1e-3)
    assert (tmp_path / "f" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()
    threshold = int(sample["sample_fraction"] * 2**64)
    picked = [d for d in train if int.from_bytes(content_hash(d)[:8], "little") < threshold]
    assert len(picked) == sample["documents"]
    assert saved_tokenizer(tmp_path / "f") == train_tokenizer(sorted(picked), 400).to_str()
    whole = prepare(tmp_path / "w", MemoryDocuments(docs), BuildSettings(domains=DOMAINS, vocab_size=400,
                                                                            val_fraction=0.05), log=quiet)
    assert whole["tokenizer"]["sample_fraction"] == 1.0 and whole["tokenizer_hash"] != forward["tokenizer_hash"]


class Killed(BaseException):
    """Stands in for SIGKILL: not an Exception, so nothing in the build catches it."""


@pytest.mark.parametrize("kill_at", ["scan-chunks.u32:3", "scan-chunks.u32:3:before", "progress.jsonl:2",
                                     "progress.jsonl:2:torn", "tokenize:5"])
def test_a_killed_build_resumes_to_identical_files(tmp_path, monkeypatch, kill_at):
    from dropup.data import prepare as module

    docs = fixture_documents()
    settings = BuildSettings(domains=DOMAINS, vocab_size=400, val_fraction=0.05, chunk_chars=8_000,
                             shard_chars=40_000, num_proc=1)
    clean_build = prepare(tmp_path / "whole", MemoryDocuments(docs), settings, log=quiet)

    calls = {"tokenize": 0, "scan": 0}
    real_commit, real_tokenize, real_scan = module._commit, module.tokenize_chunk, module.scan_chunk
    what, after, how = (kill_at + ":after").split(":")[:3]

    def counting_tokenize(*args):
        calls["tokenize"] += 1
        if what == "tokenize" and calls["tokenize"] == int(after):
            raise Killed  # in the middle of a shard group: its files are half-written
        return real_tokenize(*args)

    def counting_scan(*args):
        calls["scan"] += 1
        return real_scan(*args)

    commits = {}

    def commit(path, data):
        commits[path.name] = commits.get(path.name, 0) + 1
        if path.name == what and commits[path.name] == int(after):
            if how == "torn":  # killed in the middle of the write
                real_commit(path, data[: len(data) // 2])
            elif how == "after":
                real_commit(path, data)
            raise Killed  # "before": the chunk's records are on disk, its count is not
        real_commit(path, data)

    monkeypatch.setattr(module, "tokenize_chunk", counting_tokenize)
    monkeypatch.setattr(module, "scan_chunk", counting_scan)
    monkeypatch.setattr(module, "_commit", commit)
    with pytest.raises(Killed):
        prepare(tmp_path / "ds", MemoryDocuments(docs), settings, log=quiet)
    assert (tmp_path / "ds.partial").is_dir() and not (tmp_path / "ds").exists()
    first_tokenizes = calls["tokenize"]
    what = "never"
    log = []
    resumed = prepare(tmp_path / "ds", MemoryDocuments(docs), settings, log=log.append)
    assert any("resuming" in line for line in log) and not (tmp_path / "ds.partial").exists()
    assert resumed["corpus_hash"] == clean_build["corpus_hash"] and resumed["files"] == clean_build["files"]
    chunks, groups = resumed["scan"]["chunks"], resumed["shard_groups"]
    assert chunks > 10 and len(groups) > 3
    if kill_at == "tokenize:5":  # the interrupted group is redone from its first chunk, nothing before it
        start = next(a for a, b in groups if a <= 4 < b)
        assert calls["tokenize"] == first_tokenizes + chunks - start
    elif kill_at == "progress.jsonl:2:torn":  # the second group's record was cut short: that group is redone
        assert calls["tokenize"] == chunks + groups[1][1] - groups[1][0]
    else:  # finished groups are verified, not tokenized again
        assert calls["tokenize"] == chunks
    assert calls["scan"] == chunks + (kill_at == "scan-chunks.u32:3:before")  # only an uncounted chunk twice
    if kill_at.startswith("progress.jsonl:2"):
        finished = 1 if kill_at.endswith("torn") else 2
        assert any(f"{finished} of" in line and "verified" in line for line in log)


def test_resume_redoes_a_damaged_shard_and_starts_over_when_inputs_change(tmp_path, monkeypatch):
    from dropup.data import prepare as module

    corpus = tmp_path / "c.jsonl"
    corpus.write_bytes(FIXTURE.read_bytes())
    settings = BuildSettings(domains=DOMAINS, vocab_size=400, val_fraction=0.05, chunk_chars=8_000,
                             shard_chars=40_000, num_proc=1)
    whole = prepare(tmp_path / "whole", JsonlDocuments(corpus, DOMAINS), settings, log=quiet)
    real_commit = module._commit

    def commit(path, data):
        real_commit(path, data)
        if path.name == "progress.jsonl" and len(path.read_text().splitlines()) == 2:
            raise Killed

    monkeypatch.setattr(module, "_commit", commit)
    with pytest.raises(Killed):
        prepare(tmp_path / "ds", JsonlDocuments(corpus, DOMAINS), settings, log=quiet)
    monkeypatch.setattr(module, "_commit", real_commit)
    shard = sorted((tmp_path / "ds.partial").glob("*.00000.bin"))[0]
    shard.write_bytes(b"\0\0" + shard.read_bytes()[2:])
    log = []
    assert prepare(tmp_path / "ds", JsonlDocuments(corpus, DOMAINS), settings, log=log.append)["files"] == \
        whole["files"]
    assert any("group 0: files differ" in line for line in log)

    monkeypatch.setattr(module, "_commit", commit)
    with pytest.raises(Killed):
        prepare(tmp_path / "again", JsonlDocuments(corpus, DOMAINS), settings, log=quiet)
    monkeypatch.setattr(module, "_commit", real_commit)
    corpus.write_text(corpus.read_text().replace("the", "a"))  # edited while the build was down
    log = []
    changed = prepare(tmp_path / "again", JsonlDocuments(corpus, DOMAINS), settings, log=log.append)
    assert any("starting over" in line for line in log) and changed["corpus_hash"] != whole["corpus_hash"]
    fresh = prepare(tmp_path / "fresh", JsonlDocuments(corpus, DOMAINS), settings, log=quiet)
    assert changed["files"] == fresh["files"]


def _split_fixture(folder: Path) -> list[Path]:
    """The fixture as three files: gzip, Zstandard and plain, in the order a glob sorts them."""
    import zstandard

    lines = FIXTURE.read_bytes().splitlines(keepends=True)
    third = len(lines) // 3
    folder.mkdir()
    (folder / "part-0.jsonl.gz").write_bytes(gzip.compress(b"".join(lines[:third])))
    (folder / "part-1.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(b"".join(lines[third:2 * third])))
    (folder / "part-2.jsonl").write_bytes(b"\n".join([b"", *lines[2 * third:]]))  # a blank line is skipped
    return sorted(folder.iterdir())


def test_globs_and_compressed_files_read_like_one_plain_file(tmp_path):
    settings = BuildSettings(domains=DOMAINS, vocab_size=400, val_fraction=0.05)
    plain = prepare(tmp_path / "plain", JsonlDocuments(FIXTURE, DOMAINS), settings, log=quiet)
    parts = _split_fixture(tmp_path / "corpus")
    globbed = prepare(tmp_path / "glob", JsonlDocuments(str(tmp_path / "corpus" / "*.jsonl*"), DOMAINS), settings,
                      log=quiet)
    listed = prepare(tmp_path / "list", JsonlDocuments([str(p) for p in parts], DOMAINS), settings, log=quiet)
    assert plain["corpus_hash"] == globbed["corpus_hash"] == listed["corpus_hash"]
    assert [Path(i["path"]).name for i in globbed["inputs"]] == [p.name for p in parts]


def test_hf_disk_dataset_reads_like_the_same_jsonl(tmp_path):
    datasets = pytest.importorskip("datasets")
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    columns = {"text": [r["text"] for r in records], "domain": [r["domain"] for r in records],
               "id": list(range(len(records)))}
    datasets.Dataset.from_dict(columns).save_to_disk(str(tmp_path / "single"))
    half = len(records) // 2
    datasets.DatasetDict({
        "first": datasets.Dataset.from_dict({k: v[:half] for k, v in columns.items()}),
        "second": datasets.Dataset.from_dict({k: v[half:] for k, v in columns.items()}),
    }).save_to_disk(str(tmp_path / "dict"))
    base = {"name": "t", "domains": list(DOMAINS), "vocab_size": 400, "val_fraction": 0.05,
            "max_chars_per_domain": None}
    jsonl = ensure_prepared({**base, "source": "jsonl", "path": str(FIXTURE)}, tmp_path / "data", log=quiet)
    single = ensure_prepared({**base, "source": "hf_disk", "path": str(tmp_path / "single")}, tmp_path / "data",
                             log=quiet)
    split = ensure_prepared({**base, "source": "hf_disk", "path": str(tmp_path / "dict")}, tmp_path / "data",
                            log=quiet)
    hashes = {json.loads((p / "manifest.json").read_text())["corpus_hash"] for p in (jsonl, single, split)}
    assert len(hashes) == 1 and len({jsonl, single, split}) == 3
    data = TokenData(single, list(DOMAINS), seq_len=32)
    assert data.train_batch(3, 4, 0, "moe")[0].shape == (4, 32)
    datasets.Dataset.from_dict({"body": ["x" * 100]}).save_to_disk(str(tmp_path / "nocol"))
    with pytest.raises(DataError, match=r"no \['domain', 'text'\] column"):
        HFDiskDocuments(tmp_path / "nocol", list(DOMAINS))


def _bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    folder.mkdir()
    good = [json.dumps({"text": f"document {i} " * 20, "domain": "en"}) for i in range(30)]
    cases = {}

    def case(name, lines, pattern, suffix=".jsonl", raw=None):
        path = folder / f"{name}{suffix}"
        path.write_bytes(raw if raw is not None else "\n".join(lines).encode() + b"\n")
        cases[name] = (path, pattern)

    case("not_json", [*good[:5], "{not json", *good[5:]], r"not_json\.jsonl:6 is not valid JSON")
    case("no_text", [*good[:2], json.dumps({"body": "x", "domain": "en"})], r"no_text\.jsonl:3 has no `text` field")
    case("no_domain", [json.dumps({"text": "x" * 80})], r"no_domain\.jsonl:1 has no `domain` field")
    case("array", ["[1, 2]"], r"array\.jsonl:1 is JSON but not an object")
    case("latin1", [], r"latin1\.jsonl:2 is not UTF-8", raw=(good[0] + "\n" + '{"text": "caf\xe9"}\n').encode("latin-1"))
    whole = gzip.compress("\n".join(good * 50).encode())
    case("truncated", [], r"truncated\.jsonl\.gz: corrupt or truncated gzip data after line \d+",
         suffix=".jsonl.gz", raw=whole[: len(whole) // 2])
    case("garbage", [], r"garbage\.jsonl\.gz: corrupt or truncated gzip data after line 0", suffix=".jsonl.gz",
         raw=b"this is not gzip at all" * 10)
    cases["no_match"] = (folder / "nothing-*.jsonl", r"matches no file")
    cases["missing"] = (folder / "absent.jsonl", r"absent\.jsonl does not exist")
    return cases


def test_every_bad_input_is_named_and_nothing_is_left_behind(tmp_path):
    settings = BuildSettings(domains=("en",), vocab_size=300, val_fraction=0.1)
    for name, (path, pattern) in _bad_inputs(tmp_path / "in").items():
        with pytest.raises(DataError, match=pattern):
            prepare(tmp_path / name, JsonlDocuments(str(path), ["en"]), settings, log=quiet)
        assert not list(tmp_path.glob(f"{name}*")), name


def test_the_build_command_reports_bad_input_in_one_line(tmp_path, capsys):
    """`python -m dropup.data.build` is `sys.exit(main(argv))`: main's exit code and stderr, in this process."""
    from dropup.data.build import main

    path, _ = _bad_inputs(tmp_path / "in")["not_json"]
    code = main(["data=jsonl", f"data.path={path}", "data.domains=[en]", f"paths.data_dir={tmp_path / 'data'}"])
    assert code == 1
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: {path}:6 is not valid JSON (Expecting property name enclosed in double quotes): write one "
        "{\"text\": ..., \"domain\": ...} object per line"]
    assert not [p for p in (tmp_path / "data").glob("*") if not p.name.endswith(".lock")]
    assert main(["data.num_procs=2"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: Could not override 'data.num_procs'. To append to your config use +data.num_procs=2"]


def test_loader_reads_shards_as_one_stream_and_format_1_folders(tmp_path):
    """The same tokens cut into many shards or kept in one file per split give the same batches, including windows
    that straddle a shard boundary."""
    docs = fixture_documents()
    one = prepare(tmp_path / "one", MemoryDocuments(docs), BuildSettings(domains=DOMAINS, vocab_size=400,
                                                                            val_fraction=0.05), log=quiet)
    many = prepare(tmp_path / "many", MemoryDocuments(docs), BuildSettings(
        domains=DOMAINS, vocab_size=400, val_fraction=0.05, chunk_chars=3_000, shard_chars=6_000), log=quiet)
    assert len(many["shards"]["en.train"]) > 5 and one["corpus_hash"] == many["corpus_hash"]
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    for name, tokens in streams(tmp_path / "one").items():
        tokens.astype(np.uint16).tofile(legacy / f"{name}.bin")
    manifest = {k: v for k, v in one.items() if k != "shards"} | {"format": 1}
    (legacy / "manifest.json").write_text(json.dumps(manifest))
    loaders = [TokenData(p, list(DOMAINS), seq_len=48) for p in (tmp_path / "one", tmp_path / "many", legacy)]
    for step in range(20):
        batches = [d.train_batch(step, 8, 0, "moe")[0] for d in loaders]
        assert all(np.array_equal(batches[0], b) for b in batches[1:])
    for domain in DOMAINS:
        vals = [np.concatenate([x.numpy() for x, _ in d.val_batches(domain, 4, 4096)]) for d in loaders]
        assert all(np.array_equal(vals[0], v) for v in vals[1:])
    stream = loaders[1].train["en"]
    edge = int(stream.offsets[1])
    np.testing.assert_array_equal(stream.window(edge - 5, 10), loaders[0].train["en"].window(edge - 5, 10))


def test_duplicates_are_found_across_buckets_chunks_and_processes(tmp_path):
    """First occurrences are kept, whatever bucket or chunk the repeat lands in (the wrong variant, keeping the
    last occurrence, changes the stream order; hashing across domains would drop the shared document)."""
    docs = corpus_with_repeats()
    _, expected = reference(docs, 300, 0.1)
    for i, buckets in enumerate((7, 10**6)):
        build = Build(tmp_path / str(i), MemoryDocuments(docs), BuildSettings(
            domains=DOMAINS, vocab_size=300, val_fraction=0.1, chunk_chars=15_000, dedup_bucket_records=buckets,
            num_proc=2), None, quiet)
        manifest = build.run()
        got = streams(tmp_path / str(i))
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
        assert manifest["scan"]["duplicates"] == sum(
            len([d for d in v if len(clean(d)) >= MIN_DOC_CHARS]) - len({clean(d) for d in v
                                                                         if len(clean(d)) >= MIN_DOC_CHARS})
            for v in docs.values())


@pytest.mark.slow
def test_bundled_corpus_is_the_one_the_committed_results_were_trained_on(tmp_path):
    """Fetches the package sources (network) and builds the default corpus from scratch: its corpus hash must be the
    one recorded in every committed run (built by the previous, in-memory pipeline), so no result goes stale."""
    recorded = {json.loads(p.read_text())["provenance"]["corpus_hash"]
                for p in (ROOT / "results").glob("mini*/runs/*/results.json")
                if json.loads(p.read_text()).get("provenance", {}).get("corpus_hash")}
    assert len(recorded) == 1
    proc = subprocess.run([sys.executable, "-m", "dropup.data.build", f"paths.data_dir={tmp_path}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    manifest = json.loads((Path(proc.stdout.strip().splitlines()[-1]) / "manifest.json").read_text())
    assert {manifest["corpus_hash"]} == recorded
