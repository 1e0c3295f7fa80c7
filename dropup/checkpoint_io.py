"""Lightning checkpoints written and read without a second copy of the training state in memory.

Lightning's own `TorchCheckpointIO` serializes the whole checkpoint -- the weights and both AdamW moments, three
times the fp32 weights -- into an in-memory buffer before it writes a byte, and reads a checkpoint back whole. A run
that trains within its memory could be killed while writing its checkpoint, losing the run. `StreamingCheckpointIO`
(the trainer's for a single process and `trainer=ddp`; the sharded strategy writes DCP shards, `dropup/fsdp.py`):
- saving: `torch.save` writes each tensor's bytes straight into `<name>.partial` beside the checkpoint (a CPU tensor
  is not copied; a GPU tensor is copied to the host one at a time), the same bytes Lightning writes; the file is fsynced, renamed over the
  checkpoint, and the directory fsynced, so a file with the checkpoint's name is always complete. The file's pages
  are then dropped from the page cache: on a small machine tens of GB of dirty cache compete with the training;
- loading (`resume=true`): `torch.load(mmap=True)` maps the file; a tensor's pages are read when it is used and
  copied on first write (a private mapping: the file itself never changes), so the checkpoint is never held in
  memory beside the model it is loaded into.
The bytes are those `torch.save` writes for the same checkpoint, so a resumed run continues bit for bit.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from dropup.shards import PARTIAL_SUFFIX, fsync_dir


class StreamingCheckpointIO(TorchCheckpointIO):
    """`TorchCheckpointIO` that writes straight to a temporary file and reads by memory-mapping (module docstring)."""

    def save_checkpoint(self, checkpoint: dict, path, storage_options=None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options: it writes local files")
        save_atomically(checkpoint, Path(path))

    def load_checkpoint(self, path, map_location=None, weights_only: bool | None = None) -> dict:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        # as Lightning's: every storage stays where torch.load puts it first (the host)
        location = map_location if map_location is not None else (lambda storage, _: storage)
        return torch.load(path, map_location=location, weights_only=weights_only, mmap=True)


def save_atomically(obj, path: Path) -> None:
    """`torch.save(obj, path)` with no buffer of the whole file: written as `<path>.partial`, fsynced, renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    try:
        # into the open file (torch's writer passes each storage's bytes through, no copy), not a path: the
        # archive is then named as Lightning's in-memory save names it, so the bytes are the same as before
        with open(partial, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
            if hasattr(os, "posix_fadvise"):  # written and synced: its pages need not stay cached
                os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
