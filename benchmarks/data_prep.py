"""Corpus preparation at scale: tokens/s against raw HF tokenizers, and peak memory as the corpus doubles.

Generates a JSON-lines corpus of --gb GB of UTF-8 text (default 2) from the bundled ja/en/code corpus, decoded from
its prepared token streams: copy k of document i starts with a line "[k:i]", which makes it unique, except one document
in 100, whose copies are all the same (headed "[r:i]"), so de-duplication has work. Files of ~256 MB under --scratch.
In one run it measures, on the same files and with the same (bundled) tokenizer:
  raw   HF tokenizers' encode_batch (and once encode_batch_fast, which the build calls), on its own thread pool (all cores), over the documents of the first file (a few
        copies of the whole bundled corpus); only the encode_batch calls are timed, not the reading. Shared
        machines drift by tens of percent within minutes, so it is measured before and after every build, and each
        build is compared with the mean of the two around it (the spread is printed).
  prep  `dropup.data.prepare` in a child process with num_proc 1 and 2 and the tokenizer given (as an HF seed's
        tokenizer would be). tokens/s = tokens written / wall time of the whole build: scan, de-duplication,
        plan, tokenize, manifest. Peak memory = the largest sum, over the build's processes, of their proportional
        set size (PSS: the pages forked workers share with their parent count once), sampled every 0.1 s.
  half  the 2-process build on the first half of the files: its peak memory against the full corpus's.
  bpe   the 2-process build on the half corpus training its own BPE on the default 40 M-character sample: the
        tokenizer step's time and the peak memory.
  dedup the de-duplication step alone on --dedup-docs synthetic scan records (default 100 M; 2.4 GB of records and
        3.2 GB of buckets on disk): time, peak memory, and every planted copy found.
The last line printed is one JSON object. About 50 minutes on 2 cores at 2 GB; --gb 0.2 for a quick look.

    python benchmarks/data_prep.py [--gb 2] [--scratch /tmp/dropup-bench/data]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DOMAINS = ("ja", "en", "code")
CHILD = """
import json, sys, time
from pathlib import Path
from dropup.data.corpus import JsonlDocuments
from dropup.data.prepare import BuildSettings, prepare
args = json.loads(sys.argv[1])
start = time.perf_counter()
log = lambda m: print(f"{time.perf_counter() - start:8.1f}s {m}", flush=True)
settings = BuildSettings(domains=tuple(args["domains"]), vocab_size=8192, val_fraction=0.05, num_proc=args["procs"])
manifest = prepare(Path(args["out"]), JsonlDocuments(args["files"], args["domains"]), settings,
                   Path(args["tokenizer"]) if args["tokenizer"] else None, log=log)
tokens = sum(s["tokens"] for s in manifest["streams"].values())
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens, "scan": manifest["scan"]}))
"""


DEDUP_CHILD = """
import json, sys, time
from pathlib import Path
from dropup.data.dedup import mark_duplicates
from dropup.data.prepare import BuildSettings
folder, n = Path(sys.argv[1]), int(sys.argv[2])
settings = BuildSettings(domains=("a", "b", "c"), vocab_size=256, val_fraction=0.05)
start = time.perf_counter()
duplicates = mark_duplicates(folder / "out.partial", n, settings.dedup_bucket_records)
print(json.dumps({"seconds": time.perf_counter() - start, "duplicates": duplicates}))
"""


def dedup_at_scale(n: int, scratch: Path) -> dict:
    """Exact de-duplication alone on n synthetic scan records (random 128-bit hashes, 10% of them copies of an
    earlier record of the same domain), in a child process: time, peak PSS, and whether it finds every copy."""
    from dropup.data.workers import SCAN_RECORD

    folder = scratch / "dedup" / "out.partial"
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    rng, copies, block = np.random.default_rng(0), 0, 1 << 22
    with open(folder / "scan.bin", "wb") as f:
        for first in range(0, n, block):
            rec = np.zeros(min(block, n - first), dtype=SCAN_RECORD)
            rec["h0"], rec["h1"] = rng.integers(0, 2**64, (2, rec.size), dtype=np.uint64)
            rec["domain"], rec["chars"] = rng.integers(0, 3, rec.size), 100
            is_target = rng.random(rec.size) < 0.1
            originals, target = np.flatnonzero(~is_target), np.flatnonzero(is_target)
            earlier = np.searchsorted(originals, target)  # originals before each target
            target, earlier = target[earlier > 0], earlier[earlier > 0]
            source = originals[(rng.random(target.size) * earlier).astype(np.int64)]  # an earlier original
            for field in ("h0", "h1", "domain"):
                rec[field][target] = rec[field][source]
            copies += int(target.size)
            f.write(rec.tobytes())
    lines, peak = run_measured("dedup", DEDUP_CHILD, str(folder.parent), str(n))
    result = json.loads(lines[-1])
    shutil.rmtree(folder.parent, ignore_errors=True)
    return {"documents": n, "copies_planted": copies, "duplicates_found": result["duplicates"],
            "seconds": round(result["seconds"], 1), "peak_pss_gib": round(peak / 2**30, 3)}


def bundled_documents() -> tuple[list[tuple[str, str]], Path]:
    """The bundled corpus's documents (domain, text), decoded from its prepared streams, and its tokenizer."""
    from hydra import compose, initialize_config_dir
    from tokenizers import Tokenizer

    from dropup.data.loader import TokenStream, split_files
    from dropup.schema import register_configs
    from dropup.data import prepared_data_dir

    register_configs()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(config_name="config")
    path = prepared_data_dir(cfg, log=print)
    manifest = json.loads((path / "manifest.json").read_text())
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    docs = []
    for domain in DOMAINS:
        for side in ("train", "val"):
            stream = TokenStream(split_files(path, manifest, domain, side), np.dtype(manifest["dtype"]))
            ids = stream.window(0, stream.size)
            bounds = np.flatnonzero(ids == manifest["eot_id"])
            for a, b in zip(np.r_[0, bounds[:-1] + 1], bounds):
                docs.append((domain, tokenizer.decode(ids[a:b].tolist())))
    return docs, path / "tokenizer.json"


def write_corpus(docs, folder: Path, target_bytes: int, file_bytes: int = 256 << 20) -> list[Path]:
    """Whole copies of the bundled corpus, several per file (at least four files where the size allows), so every
    file, and so the raw sample and the half corpus, has the same mixture of domains."""
    copy_bytes = sum(len(text.encode()) for _, text in docs)
    copies = max(1, -(-target_bytes // copy_bytes))
    per_file = max(1, min(round(file_bytes / copy_bytes), copies // 4))
    folder.mkdir(parents=True)
    files = []
    for copy in range(copies):
        if copy % per_file == 0:
            files.append(folder / f"part-{len(files):05d}.jsonl")
        with open(files[-1], "a", encoding="utf-8") as f:
            for i, (domain, text) in enumerate(docs):
                header = f"[{'r' if i % 100 == 0 else copy}:{i}]\n"  # 1% are the same in every copy
                f.write(json.dumps({"text": header + text, "domain": domain}, ensure_ascii=False) + "\n")
    return files


def raw_encode(files: list[Path], tokenizer_path: Path, method: str = "encode_batch") -> dict:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    encode = getattr(tokenizer, method)
    seconds, tokens, text_bytes = 0.0, 0, 0
    for batch in _text_batches(files, 512):
        start = time.perf_counter()
        encodings = encode(batch)
        seconds += time.perf_counter() - start
        tokens += sum(len(e.ids) for e in encodings)
        text_bytes += sum(len(t.encode()) for t in batch)
    return {"seconds": seconds, "tokens": tokens, "text_bytes": text_bytes, "tokens_per_s": tokens / seconds}


def _text_batches(files: list[Path], size: int):
    batch = []
    for file in files:
        with open(file, encoding="utf-8") as f:
            for line in f:
                batch.append(json.loads(line)["text"])
                if len(batch) == size:
                    yield batch
                    batch = []
    if batch:
        yield batch


def _tree(root: int) -> list[int]:
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
                parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def _pss_bytes(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        try:
            match = re.search(r"^Pss:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
            total += int(match.group(1)) * 1024 if match else 0
        except OSError:
            continue
    return total


def run_measured(name: str, code: str, *args: str) -> tuple[list[str], int]:
    """Run `python -c code args` from the project root, echoing its output, and return its output lines and the
    peak PSS (bytes) of it and its descendants, sampled every 0.1 s."""
    child = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    peak, done = [0], threading.Event()

    def sample():
        while not done.wait(0.1):
            peak[0] = max(peak[0], _pss_bytes(_tree(child.pid)))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    lines = []
    for line in child.stdout:
        lines.append(line.rstrip())
        print(f"  [{name}] {line.rstrip()}", flush=True)
    child.wait()
    done.set()
    sampler.join()
    if child.returncode != 0:
        raise SystemExit(f"{name} failed (exit {child.returncode})")
    return lines, peak[0]


def prep(name: str, files: list[Path], procs: int, tokenizer: Path | None, scratch: Path) -> dict:
    out = scratch / f"out-{name}"
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(out.name + ".partial"), ignore_errors=True)
    args = {"out": str(out), "files": [str(f) for f in files], "procs": procs, "domains": list(DOMAINS),
            "tokenizer": str(tokenizer) if tokenizer else None}
    lines, peak = run_measured(name, CHILD, json.dumps(args))
    result = json.loads(lines[-1])
    tokenizer_line = next((line for line in lines if "tokenizer sample:" in line), None)
    shutil.rmtree(out, ignore_errors=True)
    return {"procs": procs, "seconds": round(result["seconds"], 1), "tokens": result["tokens"],
            "tokens_per_s": round(result["tokens"] / result["seconds"]), "peak_pss_gib": round(peak / 2**30, 3),
            "documents": result["scan"]["documents"], "duplicates": result["scan"]["duplicates"],
            "tokenizer_step": tokenizer_line.strip() if tokenizer_line else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gb", type=float, default=2.0, help="corpus size in GB of UTF-8 text")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/dropup-bench/data"))
    parser.add_argument("--runs", default="1proc,2proc,2proc_half,2proc_half_bpe", help="which builds, in order")
    parser.add_argument("--dedup-docs", type=int, default=100_000_000,
                        help="also de-duplicate this many synthetic documents alone (0: skip)")
    args = parser.parse_args()
    shutil.rmtree(args.scratch, ignore_errors=True)
    docs, tokenizer = bundled_documents()
    start = time.perf_counter()
    files = write_corpus(docs, args.scratch / "corpus", int(args.gb * 1e9))
    size = sum(f.stat().st_size for f in files)
    print(f"corpus: {len(files)} files, {size / 1e9:.2f} GB of JSON lines in {time.perf_counter() - start:.0f} s "
          f"({len(docs)} bundled documents copied)", flush=True)
    half = files[: max(1, len(files) // 2)]
    known = {"1proc": (files, 1, tokenizer), "2proc": (files, 2, tokenizer), "2proc_half": (half, 2, tokenizer),
             "2proc_half_bpe": (half, 2, None)}
    plan = [(name, *known[name]) for name in args.runs.split(",")]
    raws = [raw_encode(files[:1], tokenizer)]
    fast = raw_encode(files[:1], tokenizer, "encode_batch_fast")  # what the build calls: ids only
    print(f"raw encode_batch: {raws[0]['tokens_per_s']:,.0f} tokens/s; encode_batch_fast (no offsets, which the "
          f"build uses): {fast['tokens_per_s']:,.0f} tokens/s", flush=True)
    runs = {}
    for name, run_files, procs, run_tokenizer in plan:
        runs[name] = prep(name, run_files, procs, run_tokenizer, args.scratch)
        raws.append(raw_encode(files[:1], tokenizer))
        around = (raws[-2]["tokens_per_s"], raws[-1]["tokens_per_s"])
        runs[name]["raw_tokens_per_s"] = [round(r) for r in around]
        runs[name]["vs_raw"] = round(runs[name]["tokens_per_s"] / (sum(around) / 2), 3)
        print(f"{name}: {runs[name]['tokens_per_s']:,} tokens/s = {runs[name]['vs_raw']:.2f}x raw (raw before/after: "
              f"{around[0]:,.0f} / {around[1]:,.0f}), peak {runs[name]['peak_pss_gib']:.2f} GiB PSS, "
              f"{runs[name]['seconds']:.0f} s", flush=True)
    shutil.rmtree(args.scratch / "corpus", ignore_errors=True)
    dedup = dedup_at_scale(args.dedup_docs, args.scratch) if args.dedup_docs else None
    if dedup:
        print(f"dedup alone: {dedup['documents']:,} documents in {dedup['seconds']:.0f} s, peak "
              f"{dedup['peak_pss_gib']:.2f} GiB PSS; found {dedup['duplicates_found']:,} of "
              f"{dedup['copies_planted']:,} planted copies", flush=True)
    print(json.dumps({
        "corpus_gb": round(size / 1e9, 3), "files": len(files), "cores": len(os.sched_getaffinity(0)),
        "raw_tokens_per_s": [round(r["tokens_per_s"]) for r in raws],
        "raw_fast_tokens_per_s": round(fast["tokens_per_s"]),
        **{f"{name}_vs_raw": run["vs_raw"] for name, run in runs.items()},
        **{f"{name}_peak_pss_gib": run["peak_pss_gib"] for name, run in runs.items()}, "runs": runs,
        "dedup": dedup,
        "goals": {"vs_raw": 0.8, "peak_gib": 1.0},
    }))


if __name__ == "__main__":
    main()
