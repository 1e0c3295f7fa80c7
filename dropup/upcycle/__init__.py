"""dropup-upcycle: turn dense Hugging Face checkpoints into the matching MoE family (docs/design.md, contract 4),
for every family `dropup.families` registers (`python -m dropup.families` prints the table; docs/converter.md).

    dropup-upcycle --dense llama-3.7b --out mixtral-8x3.7b --init drop --ratio 0.5

The weights come from the same code `run.py` uses (`dropup.init.moe_tensors`, one generator per tensor), so the
same seed and options give the same tensors through both. The conversion streams: source tensors are read one at
a time from the safetensors files, each MoE layer is built and handed to a writer thread that appends it to the
output shard being filled, and memory holds about two layers' experts, never the model.

The output directory becomes a usable checkpoint only at the very end: shards are written under temporary names,
each finished shard is recorded with its checksums in a progress file, and the manifest, the index and, last,
`config.json` are written once every shard is in place. Killed at any point and re-run with the same arguments,
the converter checks the finished shards, writes the rest, and produces byte-identical files.
"""

import os
import sys

if "torch" not in sys.modules:
    # Building a layer allocates and frees gigabytes of temporaries, and the kernel faults in and zeroes every
    # fresh page (a quarter of the converter's cycles in a perf profile). 2 MiB pages make that cheaper: a 6-layer
    # 3.7B-shape conversion here took 44-54 s with them vs 52-59 s without, peak RSS 2.8 vs 3.1 GB. torch reads
    # the setting at its first allocation, so it only applies when the converter starts the process (the CLI).
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from dropup.upcycle.cli import build_parser, main, summary
from dropup.shards import INDEX
from dropup.upcycle.common import MANIFEST, PROGRESS, UpcycleError
from dropup.upcycle.convert import upcycle
from dropup.upcycle.inputs import open_dense
from dropup.upcycle.plan import make_strategy, plan_job
from dropup.upcycle.verify import changed_neurons

__all__ = ["INDEX", "MANIFEST", "PROGRESS", "UpcycleError", "build_parser", "changed_neurons", "main",
           "make_strategy", "open_dense", "plan_job", "summary", "upcycle"]
