"""orbax checkpoints holding everything needed for an exact resume.

Each step directory holds three items: ``state`` (params, optimizer state, step, RNG),
``data`` (the grain iterator position) and ``meta`` (resolved config, tokenizer fingerprint,
tokens/FLOPs/wall-clock so far, lineage). orbax writes into a temporary directory and renames
it when complete, so a killed save never becomes the latest checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp

from scaling_jax.errors import CheckpointError
from scaling_jax.train.state import TrainState

CHECKPOINT_DIR = "checkpoints"
MODEL_SIGNATURE_FIELDS = ("layers", "d_model", "heads", "kv_heads", "head_dim", "d_ff", "mlp", "tie_embeddings",
                          "vocab_size", "param_dtype")


def _as_tree(state: TrainState) -> dict:
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}


def model_signature(model_cfg: dict) -> dict:
    """The model fields a checkpoint's parameters depend on (their shapes and dtypes)."""
    return {k: model_cfg[k] for k in MODEL_SIGNATURE_FIELDS}


class Checkpointer:
    def __init__(self, run_dir: str, keep: int, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: TrainState, data_iter: grain.DatasetIterator, meta: dict) -> None:
        args = ocp.args.Composite(state=ocp.args.StandardSave(_as_tree(state)),
                                  data=grain.checkpoint.CheckpointSave(data_iter),
                                  meta=ocp.args.JsonSave(meta))
        self.manager.save(step, args=args, force=True)

    def read_meta(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, abstract: TrainState, shardings: TrainState,
                data_iter: grain.DatasetIterator | None) -> tuple[TrainState, dict]:
        """Restore onto ``shardings`` (any mesh) and move ``data_iter`` to the saved position."""
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                              _as_tree(abstract), _as_tree(shardings))
        items: dict[str, Any] = {"state": ocp.args.StandardRestore(target), "meta": ocp.args.JsonRestore()}
        if data_iter is not None:
            items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**items))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this model ({e}); "
                                  "use the model settings it was trained with or a new train.run_dir") from None
        tree = out["state"]
        return TrainState(step=tree["step"], params=tree["params"], opt_state=tree["opt_state"], rng=tree["rng"]), \
            out["meta"]

    def restore_partial(self, step: int, target: dict) -> dict:
        """Restore only the items of ``target`` (e.g. ``{"params": ...}``), each leaf a
        ``jax.ShapeDtypeStruct`` carrying the sharding to place it with.

        Inference and stage continuation need parameters without paying for optimizer moments.
        """
        path = os.path.join(self.directory, str(step), "state")
        if not os.path.isdir(path):
            raise CheckpointError(f"checkpoint {self.directory}/{step} has no saved state; "
                                  "pass a run directory with a finished checkpoint")
        restore_args = ocp.checkpoint_utils.construct_restore_args(target)
        try:
            return ocp.PyTreeCheckpointer().restore(
                path, args=ocp.args.PyTreeRestore(item=target, restore_args=restore_args, partial_restore=True))
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"checkpoint {self.directory}/{step} does not match this model ({e}); "
                                  "use the model settings it was trained with") from None

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.close()
