"""`ranklens plan`: the memory one rank needs to train an SAE, before renting the devices.

For a `train sae` config, a torchrun world size W and ``--shards`` S (W / S data-parallel replicas, each over S
blocks of F / S features), per rank, in bytes:

- parameters: the block's encoder and decoder rows and encoder biases, plus the replicated decoder bias, in
  float32 (master weights; bf16 autocast keeps float32 parameters);
- gradients: the same size (dense over the block: the sparse kernels write zeros outside the active rows);
- optimizer: Adam's or SparseAdam's two moments, twice the parameters (SparseAdam's per-row step counts are a
  [block] vector);
- activations: the transient of one step on the replica's share B / (W / S) of the batch: the encoder's
  pre-activations, computed in chunks of at most 128 MB (``kernels.topk_encode``), the inputs, codes and
  reconstructions, and with AuxK the pre-activations of up to every feature of the block when all are dead;
- data: the store reader's shuffle buffer (``--shuffle-buffer-tokens`` rows of d in the model's dtype).

The numbers are the tensors' sizes, not measurements of an allocator; leave headroom (CUDA's caching allocator and
the model, when training on the fly, come on top).
"""

from __future__ import annotations

from ranklens.train.config import SAETrainConfig

_PRE_CHUNK_BYTES = 128 << 20
FLOAT = 4


def memory_plan(cfg: SAETrainConfig, d: int, world_size: int, shards: int, store_bytes_per_value: int = 2,
                ) -> dict[str, int]:
    """Bytes per rank of each part (see the module docstring) and their total."""
    n_features = cfg.n_features or cfg.expansion * d
    replicas = world_size // shards
    block = n_features // shards
    batch = cfg.batch_size // replicas
    k = cfg.k
    params = (2 * block * d + block + d) * FLOAT
    pre = min(batch * block * FLOAT, max(_PRE_CHUNK_BYTES, d * block * FLOAT))
    step = pre + batch * d * FLOAT * 4 + batch * k * (FLOAT + 8) * 2 + (batch * block * FLOAT if cfg.aux_k else 0)
    parts = {"parameters": params, "gradients": params, "optimizer": 2 * params + block * 8,
             "activations": step, "data": cfg.shuffle_buffer_tokens * d * store_bytes_per_value}
    parts["total"] = sum(parts.values())
    return parts


def describe_plan(cfg: SAETrainConfig, d: int, world_size: int, shards: int) -> str:
    parts = memory_plan(cfg, d, world_size, shards)
    n_features = cfg.n_features or cfg.expansion * d
    lines = [f"{n_features:,} features of d = {d}, k = {cfg.k}, batch {cfg.batch_size:,}: {world_size} ranks = "
             f"{world_size // shards} data-parallel replicas x {shards} feature blocks of {n_features // shards:,}",
             "per rank:"]
    lines += [f"  {name:<12}{value / 2**30:>10.2f} GiB" for name, value in parts.items()]
    return "\n".join(lines)
