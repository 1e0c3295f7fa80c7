"""A computed scaling plan: memory per GPU, the largest micro-batch, communication and run time of a config
trained with FSDP2 on `gpus` GPUs, and where expert parallelism would start to pay.

    python -m dropup.scaling experiment=paper_8x3.7b gpus=64 gpu_mem_gib=80
    python -m dropup.scaling --docs            # rewrite the generated tables of docs/scaling.md (--check: compare)

Arguments are Hydra overrides of the run's config plus the scaling knobs of `KNOBS` (plain key=value, not config
keys). The output is a Markdown table and, as its last line, one JSON object (`plan()`'s dict).

The training setup modelled is `dropup/fsdp.py`'s: FSDP2 (`fully_shard`) per Block plus the root (embeddings,
final norm, LM head); N ranks, P parameters, P_root the root's, P_block one block's.
- bf16-mixed (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`): fp32 master shards 4P/N, fp32 gradient
  shards 4P/N, AdamW exp_avg and exp_avg_sq 8P/N; bf16 unsharded parameters of the root and two blocks (the one
  running and the prefetched one) while computing; during a block's backward its unsharded bf16 gradients plus
  their fp32 copy for the reduce-scatter (6 P_block). 32-true: the same in fp32 (4-byte working copies, 4 P_block
  of unsharded gradients, nothing to cast).
- Blocks reshard after forward (all-gathered in forward and again in backward, per micro-batch); the root does not
  (FSDP2's default for the root: gathered once per micro-batch, freed after its backward). Gradients are
  reduce-scattered once per micro-batch, in fp32. The root's unsharded gradients (LM head first, embeddings last)
  live until the end of the backward, where they are reduce-scattered.
- Activation checkpointing per Block (non-reentrant): a block keeps its input only, and its activations are live
  again while its backward runs.

Activations are MEASURED, not assumed: `measure_activations` runs our own `Transformer` (forward + loss) under
`torch.autograd.graph.saved_tensors_hooks` and adds up every storage autograd saves, once per storage, parameters
excluded (FSDP frees and re-gathers those). Under bf16-mixed the model is cast to bf16 and run under bf16 autocast:
FSDP2's param_dtype=bf16 hands every module bf16 parameters (norm gains and embeddings included), and Lightning's
bf16-mixed adds autocast on top; a model kept in fp32 under autocast alone would save fp32 residual streams that the
FSDP run never has. Under 32-true it runs in fp32. Full widths in bf16 are far too slow on a CPU (emulated bf16),
so widths are divided by factors s (d_model, d_ff, heads and KV heads /s; head width, experts and top-k kept) at
a small vocabulary, and:
- for each such model the saved bytes of one forward are, exactly, B*S*per_token + S*per_position + const (flash
  attention saves its output and logsumexp, nothing quadratic in S; RoPE's cast cos/sin tables are per position):
  three (B, S) points fix the three, a fourth (the tests) confirms them;
- a layer's bytes are those of a 2-layer model minus a 1-layer one; the root's (embedding indices, final norm, LM
  head input, the logits the loss saves, targets) are the 1-layer model's minus one layer;
- every per-token tensor is (tokens x a width), so each coefficient is a + b/s exactly: two factors give the
  full-width value (the tests check that two predict a third and s = 1 exactly, with Fractions);
- the root's bytes are affine in the vocabulary (the saved logits): a second vocabulary gives the slope;
- checkpointed, a run keeps what autograd saves outside the blocks plus each block's inputs (non-reentrant
  checkpointing saves the inputs of its region, nothing inside): read off the same forward passes, and checked
  in the tests against the model's own checkpointed forward (`Transformer.set_activation_checkpointing`).
Sliding windows are measured without the window (the GPU kernels keep out + logsumexp either way).

Not measured, stated: the loss's gradient of the logits (T x V in the compute dtype, what ChunkedCrossEntropy's
backward writes) and its chunk workspace (512 rows x V in fp32 plus a compute-dtype copy), and, while one block's
backward runs, a workspace of that block's saved bytes again for the activation gradients in flight (an
assumption: each saved activation's gradient has at most its shape, and autograd frees them as it goes). The peak
is the largest of four moments: the loss's backward (all activations + logits gradient), a block's backward
(activations less the logits, the block's recomputed activations when checkpointing, its workspace and
gradients, the LM head's gradient), the root's reduce-scatter at the end of the backward, and the optimizer step
(torch's foreach AdamW holds one fp32 temporary of the shard, sqrt(exp_avg_sq)). Capacity is gpu_mem_gib less
reserve_gib (CUDA context, NCCL buffers, allocator fragmentation).

Host memory per GPU at initialization (`dropup.memory.init_host_memory`; trainer=fsdp builds the model on the
meta device and each rank materializes only its shards, `dropup.init.producer`): the rank's fp32 shards 4P/N,
plus the largest unit the producer holds whole, a layer's stacked experts (w_gate_up and w_down are built
together: 4 * 3 E D F_e bytes; or the embedding, 4 V D, where that is larger), plus the dense tensors it is read
from (the seed's three FFN matrices, 4 * 3 D F). Per node: gpus_per_node times that (the node's ranks share its
host). Summed over the N ranks the shards are the fp32 state, 4P, exactly; the unit and its sources are per rank.

Communication per GPU per step (ring collectives, bytes each GPU sends): per micro-batch the blocks are gathered
twice and the root once in the parameter dtype, and all gradients reduce-scattered in fp32:
    n_micro * (N-1)/N * (w * (P_root + 2 * P_blocks) + 4 * P),       w = 2 (bf16-mixed) or 4 (32-true).
Time: within a node (N <= gpus_per_node) at nvlink_gbps; across nodes NCCL's rings run one per NIC (rail-aligned),
so each GPU sends 1/gpus_per_node of its ring traffic over its NIC at internode_gbps and the rest over NVLink, at
the same time: t = max((1 - f) * V / nvlink, f * V / internode), f = 1/gpus_per_node (0 inside one node).
Bandwidths are per direction peak rates: no latency, no congestion, so this is a lower bound.

Compute per step per GPU: `dropup.flops.train_flops` of its B*S/N tokens (3x the Table 3 forward), plus the blocks'
forward again when checkpointing (the recomputation: the forward less embeddings and logits), divided by
mfu * peak_tflops, or, where `tokens_per_s` is given (the tokens/s one GPU reached on this model without
checkpointing), the tokens over that rate (scaled by the recomputation). Step = max(compute, communication)
(overlapped) and the sum (not overlapped); run = train.tokens / (B*S) steps.

Expert parallelism (EP, degree e = min(N, E)) would instead keep experts in place and move tokens: per MoE layer and
micro-batch of T_mb = m*S tokens, dispatch and combine in the forward and their gradients in the backward (a = 4
all-to-alls; 6 with checkpointing, whose recomputed forward repeats both), each carrying k copies of d_model per
token in the parameter dtype, of which (e-1)/e leave the GPU under even routing. FSDP moves, per micro-batch, the
routed experts' P_exp = L*E*3*D*F parameters gathered twice (w bytes) and reduce-scattered (4 bytes):
    EP bytes / step   = n_micro * a * L * T_mb * k * D * w * (e-1)/e
    FSDP bytes / step = n_micro * P_exp * (2w + 4) * (N-1)/N
so EP moves fewer bytes when T_mb < T* = 3 E F (2w + 4) / (a k w) * [(N-1)/N] / [(e-1)/e]; with bf16-mixed
(2w+4 = 8 = a*w without checkpointing) T* = 3 E F / k. T_mb = min(m, B/N) * S shrinks once a GPU's share of the
batch, B/N sequences, falls below the micro-batch that fits: `ep_pays_from_gpus` is the smallest N (dividing B)
with T_mb < T*. A byte count only: EP also changes memory (experts not sharded over all N).
"""

from dropup.tools.scaling.activations import CE_CHUNK_ROWS, GIB, build_model, measure_activations, saved_bytes, \
    scale_factors
from dropup.tools.scaling.cli import main, split_args
from dropup.tools.scaling.memory import comm_bytes_per_micro_batch, ep_bytes, max_micro_batch, parameter_split, \
    predict_memory
from dropup.tools.scaling.plan import BEGIN, DOCS, END, KNOBS, docs_section, plan, render, rewrite_docs, \
    setup_from_config

__all__ = ["BEGIN", "CE_CHUNK_ROWS", "DOCS", "END", "GIB", "KNOBS", "build_model", "comm_bytes_per_micro_batch",
           "docs_section", "ep_bytes", "main", "max_micro_batch", "measure_activations", "parameter_split", "plan",
           "predict_memory", "render", "rewrite_docs", "saved_bytes", "scale_factors", "setup_from_config",
           "split_args"]
