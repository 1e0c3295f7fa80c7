"""Which training windows a run reads: each kind of run has its own stream, and the map (stream, seed, step) ->
windows has a version (no torch import: the seed store and the sweep key on it)."""

# Version of the map (stream, seed, step) -> training windows. Runs and dense seeds of another version read other
# data: the seed store keys on it and the sweep reruns such runs instead of mixing them in.
# 1: keyed on (seed, step) only, so a seed-0 MoE replayed its dense seed's batches. 2: keyed on the stream too.
DATA_STREAM_VERSION = 2
# Each kind of run reads its own stream; MoE runs of one seed share theirs, so paired comparisons see equal data.
STREAMS = ("moe", "dense", "seed", "branch-<domain>")
