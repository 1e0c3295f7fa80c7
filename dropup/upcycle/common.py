"""What every part of the converter shares: file names, dtypes, limits, the error type, formatting."""

from __future__ import annotations

import re
from pathlib import Path

import torch

FORMAT = "dropup-upcycle/1"
PROGRESS = ".dropup-upcycle-progress.json"
MANIFEST = "dropup_manifest.json"
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
# Files carried over from the (first) dense directory: the tokenizer and generation defaults.
CARRIED_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                 "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                 "generation_config.json")
# Fields of the dense config.json that describe the tokenizer or the context rather than the architecture.
KEPT_CONFIG_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings")
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_LABELS = {torch.bfloat16: "bfloat16", torch.float32: "float32", torch.float16: "float16",
                torch.float64: "float64"}
# Experts built at a time: 2 measured 1.2-1.5x faster than 1 on this 2-core machine (bit-identical), for one more
# expert's temporaries (about 0.4 GB at the 3.7B shape).
BUILD_THREADS = 2
# --verify runs both models in transformers only below this size (fp32 copies of dense + MoE must fit in RAM).
VERIFY_MAX_PARAMS = 1_000_000_000


class UpcycleError(RuntimeError):
    """The conversion itself went wrong (not the user's input): the message says what and how to recover."""


def _existing_parent(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    raise AssertionError("unreachable")
