"""Run directories from and to other frameworks' checkpoints, whatever the framework.

Every importer (Hugging Face, MaxText, T5X) maps the source's tensors to our parameter tree and hands them
here: ``import_run`` claims ``--out``, writes the tokenizer, a step-0 checkpoint through the trainer's own
Checkpointer (fresh AdamW moments, sharded as training shards them), lineage that starts with an import
record, and config.yaml last, so ``scaling-jax train RUN_DIR`` and ``continue --from RUN_DIR`` work on it.
Every exporter reads a run's parameters with ``read_run_params`` and writes through ``write_new_dir``, so its
output appears complete or not at all.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import grain
import jax
import jax.numpy as jnp
import numpy as np

from scaling_jax import paths
from scaling_jax import run_dir as run_dirs
from scaling_jax.config import Config, load_config, save_config, to_dict
from scaling_jax.data.tokenizer import Tokenizer
from scaling_jax.errors import CheckpointError, ConfigError
from scaling_jax.interop.hf_weights import decoder_params
from scaling_jax.objectives.base import build_objective
from scaling_jax.parallel.mesh import build_mesh
from scaling_jax.parallel.sharding import replicated, rules_from_config
from scaling_jax.run_dir import CONFIG_FILE, LINEAGE_FILE, CheckpointMeta
from scaling_jax.train.checkpoint import Checkpointer
from scaling_jax.train.loop import write_json
from scaling_jax.train.state import TrainState, abstract_model, make_optimizer, state_layout


@dataclass(frozen=True)
class Source:
    """Where imported weights came from, for lineage: ``kind`` names the framework (``hf``, ``maxtext``, ``t5x``)
    and ``model`` its architecture (``hf-llama``, ``maxtext-llama``, ``t5x-decoder``)."""

    kind: str
    model: str
    path: str


def check_out(run_dir: str, flag: str = "--out") -> None:
    """Refuse an output that is remote or already holds a run, before anything is read or written."""
    if paths.is_remote(run_dir):
        raise CheckpointError(f"{flag} '{run_dir}' must be a local directory (an imported run's config points at "
                              "its tokenizer file on local disk); import to a local directory and train from there")
    if not run_dirs.check_claimable(run_dir, flag):
        raise CheckpointError(f"{flag} '{run_dir}' already holds a run; choose a new or empty run directory")


def check_model_overrides(user: Mapping, fields: Mapping, fixed: tuple[str, ...], source: str, fix: str) -> None:
    """A ``model.*`` override of a field the checkpoint fixes (its shape) must agree with it."""
    for key, value in user.items():
        name = key.removeprefix("model.")
        if key.startswith("model.") and name in fixed and value != fields[name]:
            raise ConfigError(f"{key}={value!r} contradicts {source} ({fields[name]!r}); {fix}")


def tokenizer_choice(tokenizer: str | None, user: dict) -> str | None:
    """``--tokenizer`` or ``data.tokenizer=`` (taken out of ``user``), never both."""
    if tokenizer and "data.tokenizer" in user:
        raise ConfigError("give the tokenizer once: --tokenizer or data.tokenizer=, not both")
    return tokenizer or user.pop("data.tokenizer", None)


def tokenizer_rows(tokenizer: Tokenizer) -> int | None:
    """The ids a source tokenizer file defines (``base_size``; our reserved ids lie above), None for the byte
    tokenizer: embedding rows from there on are padding or ours, and start as the mean (``resize_vocab``)."""
    return getattr(tokenizer, "base_size", None)


def grown_vocab_size(checkpoint_rows: int, tokenizer: Tokenizer, user: dict) -> int:
    """The run's vocabulary: ``model.vocab_size=`` (taken out of ``user``) or the larger of the checkpoint's rows
    and the tokenizer's ids (our pad / mode / sentinel ids may lie above the source's); it can grow, never shrink."""
    needed = max(checkpoint_rows, tokenizer.vocab_size)
    size = user.pop("model.vocab_size", needed)
    if not isinstance(size, int) or size < needed:
        raise ConfigError(f"model.vocab_size={size!r} must be an integer >= {needed} (the checkpoint's and the "
                          "tokenizer's vocabulary); the embedding can grow, never shrink")
    return size


def import_run(run_dir: str, source: Source, tokenizer: Tokenizer, settings: Mapping,
               make_params: Callable[[Config], dict]) -> Config:
    """Claim ``run_dir`` and write an imported run into it; on any error a directory this call created is
    removed again. ``settings`` are dotted config values (the model's shape from the source, then the user's
    overrides); ``make_params(config)`` returns the parameter tree in our layout for that config."""
    check_out(run_dir)
    claimed = run_dirs.claim(run_dir, "--out")
    run_dirs.mark(run_dir)
    try:
        spec = tokenizer.save(os.path.abspath(os.path.join(run_dir, run_dirs.TOKENIZER_DIR)))  # the run carries it
        config = load_config(None, {**settings, "data.tokenizer": spec, "train.run_dir": run_dir})
        params = make_params(config)
        lineage = _import_lineage(config, source, run_dir)
        meta = CheckpointMeta(config=to_dict(config), tokenizer=tokenizer.fingerprint(), step=0, total_step=0,
                              tokens=0, flops=0.0, lineage=lineage, data_index=0)
        checkpointer = Checkpointer(run_dir, config.train.keep_checkpoints, async_save=False)
        try:
            checkpointer.save(0, _train_state(config, params), _start_of_stream(), meta.to_json())
            checkpointer.wait()
        finally:
            checkpointer.close()
        save_config(config, os.path.join(run_dir, CONFIG_FILE))  # last: a run dir with config.yaml is complete
        write_json(os.path.join(run_dir, LINEAGE_FILE), lineage)
        return config
    except BaseException:
        run_dirs.discard_fresh(run_dir, claimed)
        raise


def read_run_params(run_dir: str, step: int | None = None) -> tuple[Config, int, dict]:
    """A run's config, the step read (default: latest) and its plain-decoder parameters as numpy arrays
    (multi-token runs give their next-token decoder, ``hf_weights.decoder_params``)."""
    saved = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.isfile(saved):
        raise CheckpointError(f"--checkpoint '{run_dir}' has no config.yaml; pass a run directory")
    config = load_config(saved, saved_run=True)
    m = config.model
    checkpointer = Checkpointer(run_dir, config.train.keep_checkpoints, async_save=False)
    try:
        step = checkpointer.latest_step() if step is None else step
        if step is None or step not in checkpointer.manager.all_steps():
            raise CheckpointError(f"'{run_dir}' has no checkpoint{'' if step is None else f' at step {step}'}; "
                                  "train first or pick a saved step")
        _, shapes, _ = abstract_model(m, build_objective(config.objective).build_model)
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), shapes)
        restored = checkpointer.restore_partial(step, {"params": target})["params"]
    finally:
        checkpointer.close()
    return config, int(step), jax.tree.map(np.asarray, decoder_params(restored, m))


def check_new_dir(out_dir: str, flag: str) -> None:
    out_dir = os.path.abspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise CheckpointError(f"{flag} '{out_dir}' exists and is not an empty directory; choose a new one")


def write_new_dir(out_dir: str, flag: str, write: Callable[[str], None]) -> str:
    """Run ``write(tmp)`` into a directory beside ``out_dir`` and rename it into place: the output appears
    complete or not at all, and never replaces anything but an empty directory."""
    out_dir = os.path.abspath(out_dir)  # "." names the current directory, which rmdir cannot take
    check_new_dir(out_dir, flag)
    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out_dir))}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _import_lineage(config: Config, source: Source, run_dir: str) -> list[dict]:
    """Lineage records in the loop's format: the source checkpoint as a finished earlier stage, then this
    run's own (empty so far) record, which ``train`` takes over when it resumes the step-0 checkpoint."""
    zero = {"steps": 0, "tokens": 0, "flops": 0.0, "total_tokens": 0, "total_flops": 0.0}
    origin = source.path if paths.is_remote(source.path) else os.path.abspath(source.path)
    return [{"stage": f"{source.kind}-import", "objective": source.model, "run_dir": origin, "parent": None,
             "parent_step": None, "start_step": 0, **zero},
            {"stage": config.stage.name, "objective": config.objective.name, "run_dir": os.path.abspath(run_dir),
             "parent": origin, "parent_step": 0, "start_step": 0, **zero}]


def _train_state(config: Config, params: dict) -> TrainState:
    """A step-0 TrainState holding ``params``, sharded as training would shard it, with fresh AdamW moments."""
    mesh = build_mesh(config.mesh)
    tx, _ = make_optimizer(config.optimizer, config.train.steps)
    layout = state_layout(config.model, tx, config.train.seed, build_objective(config.objective).build_model,
                          mesh, rules_from_config(config.mesh.rules))
    got = jax.tree.map(lambda a: (a.shape, str(a.dtype)), params)
    want = jax.tree.map(lambda s: (tuple(s.shape), str(s.dtype)), layout.shapes)
    if got != want:
        raise ConfigError(f"objective={config.objective.name} trains another parameter tree than a plain decoder; "
                          "import with the default objective and switch objectives in a continuation stage")
    placed = jax.tree.map(lambda a, s: jax.make_array_from_callback(a.shape, s, lambda idx: a[idx]),
                          params, layout.params_sharding)  # every process holds the file; each places its shards
    opt_state = jax.jit(tx.init, out_shardings=layout.state_sharding.opt_state)(placed)
    rep = replicated(mesh)
    return TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), rep), params=placed, opt_state=opt_state,
                      rng=jax.device_put(jax.random.key_data(jax.random.key(config.train.seed)), rep))


def _start_of_stream():
    """A data-iterator position at the start of the stream, for the checkpoint's ``data`` item.

    Our training pipeline is a random-access grain ``MapDataset`` whose iterator state is only the next index,
    so a fresh iterator's state is the start of any such stream; ``train`` resuming an imported run then reads
    its data from the first batch (a test holds this)."""
    return iter(grain.MapDataset.range(1).to_iter_dataset())
