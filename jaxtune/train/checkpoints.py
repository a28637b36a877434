"""Orbax checkpoints in `output_dir/checkpoints/<step>/`: train state plus data-loader position.

Saves are asynchronous (training continues while arrays are written) and atomic: orbax writes
into a temporary directory and renames it when complete, so the newest *finished* step is always
a whole checkpoint; an interrupted save leaves no step directory behind. Restores place every
array straight into its shard from the abstract state (shapes + shardings).
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from jaxtune.errors import CheckpointError
from jaxtune.train.state import TrainState


class Checkpoints:
    """Save and restore `(TrainState, loader state)` under `directory`."""

    def __init__(self, directory: str, *, keep: int | None = None, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as e:
            raise CheckpointError(f"output_dir: cannot write checkpoints to {self.directory}: {e.strerror}") from e
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "loader"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, state: TrainState, loader_state: dict, *, force: bool = False) -> None:
        """Start writing step `step` (returns before the bytes are on disk when async)."""
        try:
            self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                             loader=ocp.args.JsonSave(loader_state)), force=force)
        except OSError as e:
            raise CheckpointError(f"saving checkpoint {step} to {self.directory} failed: {e}; "
                                  "earlier checkpoints are intact") from e

    def restore(self, abstract_state: TrainState, step: int | None = None) -> tuple[int, TrainState, dict]:
        """(step, state, loader state) of `step` (default: the newest), placed as `abstract_state` says."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        restored = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), loader=ocp.args.JsonRestore()))
        return step, restored["state"], restored["loader"]

    def wait(self) -> None:
        """Block until the last save is on disk (call before exiting)."""
        try:
            self._manager.wait_until_finished()
        except OSError as e:
            raise CheckpointError(f"finishing a checkpoint in {self.directory} failed: {e}") from e

    def close(self) -> None:
        self.wait()
        self._manager.close()


def abstract_like(state: TrainState) -> TrainState:
    """Shapes, dtypes and shardings of a state, for `Checkpoints.restore`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
