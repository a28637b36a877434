"""From prepared examples to global device batches `[accum, rows, T]` on the mesh.

Each process loads only its share of every step's rows (the loader deals examples round-robin
to processes); `jax.make_array_from_process_local_data` assembles the global array. Rows per
step = micro_batch_size × data-parallel size (data × fsdp) × gradient_accumulation_steps, as in
Axolotl, where micro_batch_size is per data-parallel shard.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding

from jaxtune.config import Config
from jaxtune.data.loader import Loader, make_loader
from jaxtune.data.prepare import PreparedData, prepare_datasets
from jaxtune.errors import ConfigError
from jaxtune.kernels.ring_attention import zigzag_permutation
from jaxtune.train.loss import next_token_targets


@dataclasses.dataclass
class TrainLoader:
    loader: Loader

    def next_batch(self) -> dict[str, np.ndarray]:
        return next(self.loader)

    def get_state(self) -> dict:
        return self.loader.get_state()

    def set_state(self, state: dict) -> None:
        self.loader.set_state(state)


@dataclasses.dataclass
class EvalLoader:
    make: callable  # () -> a fresh one-epoch Loader

    def batches(self) -> Iterator[dict[str, np.ndarray]]:
        yield from self.make()


@dataclasses.dataclass
class TrainData:
    prepared: PreparedData
    train: TrainLoader
    eval: EvalLoader | None
    steps_per_epoch: int
    accum: int
    context_parallel: int = 1  # mesh.sequence: > 1 means ring attention over zigzag-ordered rows

    def to_device(self, host_batch: dict[str, np.ndarray], sharding: NamedSharding, accum: int) -> dict:
        """This process's rows `[accum * local_rows, T]` → the global `[accum, rows, T]` arrays.

        With context parallelism the next-token targets are computed here, in token order, and
        then every array is put in the zigzag layout ring attention balances its work with.
        """
        if self.context_parallel > 1:
            host_batch = dict(host_batch)
            host_batch["targets"] = np.asarray(next_token_targets(host_batch["labels"], host_batch["segment_ids"]))
            perm = zigzag_permutation(host_batch["input_ids"].shape[-1], self.context_parallel)
            host_batch = {name: array[:, perm] for name, array in host_batch.items()}
        out = {}
        for name, local in host_batch.items():
            local = local.reshape(accum, -1, local.shape[-1])
            global_shape = (accum, local.shape[1] * jax.process_count(), local.shape[2])
            out[name] = jax.make_array_from_process_local_data(sharding, local, global_shape)
        return out


def prepare_data(cfg: Config, mesh: Mesh) -> TrainData:
    """Tokenise/pack (or reuse the cache), then loaders sized for the mesh.

    On a multi-process run, process 0 builds the cache while the others wait, then they read it:
    one tokenisation per job and no two processes writing the same cache folder.
    """
    if jax.process_count() > 1:
        if jax.process_index() == 0:
            prepare_datasets(cfg)
        multihost_utils.sync_global_devices("jaxtune: datasets prepared")
    prepared = prepare_datasets(cfg)
    dp = mesh.shape["data"] * mesh.shape["fsdp"]
    rows_per_micro = cfg.micro_batch_size * dp
    if rows_per_micro % jax.process_count():
        raise ConfigError(f"micro_batch_size × data-parallel size = {rows_per_micro} rows is not divisible by "
                          f"the {jax.process_count()} processes")
    local_rows = rows_per_micro // jax.process_count() * cfg.gradient_accumulation_steps
    train = make_loader(prepared.train, batch_size=local_rows, seed=cfg.seed,
                        shuffle=cfg.shuffle_merged_datasets, micro_batches=cfg.gradient_accumulation_steps)
    evaluation = None
    if prepared.eval is not None and len(prepared.eval):
        evaluation = EvalLoader(lambda: make_loader(prepared.eval, batch_size=local_rows, shuffle=False,
                                                    num_epochs=1, drop_remainder=False,
                                                    micro_batches=cfg.gradient_accumulation_steps))
    context_parallel = mesh.shape["sequence"]
    if cfg.sequence_len % (2 * context_parallel):
        raise ConfigError(f"sequence_len {cfg.sequence_len} must be divisible by 2 × mesh.sequence "
                          f"({2 * context_parallel}) for the zigzag layout of ring attention")
    return TrainData(prepared, TrainLoader(train), evaluation, max(1, train.steps_per_epoch),
                     cfg.gradient_accumulation_steps, context_parallel)
