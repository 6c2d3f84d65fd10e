"""Every knob as a dataclass; YAML files plus dotted ``key=value`` overrides.

A config is built in three steps: read YAML into a plain dict, apply command-line overrides
to that dict, then convert it to dataclasses while checking every key and type. Errors name
the dotted field and the fix, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from scaling_jax import paths
from scaling_jax.errors import ConfigError
from scaling_jax.series import apply_series


@dataclass
class ModelConfig:
    """Decoder shape. ``series`` (e.g. ``passuntil:2``, ``kaplan:6x512``) fills the shape fields."""

    series: str = "custom"
    layers: int = 4
    d_model: int = 128
    heads: int = 2
    kv_heads: int = 0  # 0 means multi-head attention (kv_heads = heads)
    head_dim: int = 64
    d_ff: int = 320
    mlp: str = "geglu"  # geglu | swiglu
    tie_embeddings: bool = True
    vocab_size: int = 0  # 0: taken from the tokenizer
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02
    dtype: str = "float32"  # compute dtype: float32 | bfloat16
    param_dtype: str = "float32"
    # What the backward pass recomputes instead of saving: none | full | minimal | save_dots | save_qkv_proj |
    # offload | full_offload (names as MaxText's remat_policy; older configs' true / false mean full / none)
    remat: str = "none"
    scan_layers: bool = True  # blocks stacked on a `layers` axis and scanned: compile time flat in depth
    # Training attention kernel: auto (splash on TPU, cudnn on GPU where it fits, else xla) | xla (explicit mask)
    # | splash (Pallas TPU kernel; interpret mode elsewhere) | cudnn. KV-cache decoding always uses xla, and so does
    # every choice when position=t5_relative: a position bias cannot go through the splash kernel.
    attention: str = "auto"
    # cuDNN on Hopper: causal rows pass each row's documents as segment offsets (no mask tensor) when no row holds
    # more than this many; a batch with a fuller row takes the dense-mask path. Memory and time grow with it (one
    # H100, 0.97B, batch 16: 16 -> 49.9% MFU, +8 GiB over the mask's 40.8 GiB; 32 -> 46.9%, +15 GiB). 0: mask always.
    cudnn_max_segments: int = 16
    # Positions: rope (rotary, per-document positions) | t5_relative (T5 / T5X: learned per-head attention biases
    # by bucketed query-key distance, one table shared by all layers, causal buckets; no rotation)
    position: str = "rope"
    relative_buckets: int = 32  # t5_relative: half exact distances, half log-spaced up to relative_max_distance
    relative_max_distance: int = 128  # t5_relative: distances from here on share the last bucket
    # Output logits: none | rsqrt_d_model (divided by sqrt(d_model), as T5X's decoder-only models with tied
    # embeddings do)
    logits_scale: str = "none"


@dataclass
class DataConfig:
    """Where tokens come from and how they are packed into rows."""

    source: str = "stdlib"  # 'stdlib' (the embedded default) or a file path / glob
    format: str = "auto"  # auto | text | jsonl | parquet
    text_field: str = "text"  # column / key holding the text for jsonl, parquet and HF datasets
    hf_name: str = ""  # source=hf:...: the data set's configuration name (load_dataset's `name`)
    source_split: str = "train"  # split read from an HF data set or seqio task (ours is by data.val_fraction)
    streaming: bool = False  # source=hf:...: iterate instead of materialising the data set
    seqio_modules: list = field(default_factory=list)  # source=seqio:NAME: modules imported to register tasks
    seqio_feature: str = "targets"  # source=seqio:NAME: output feature whose token ids become documents
    # Sampling mixture of sources; non-empty replaces data.source. Each entry overrides data.* keys:
    # [{source: PATH | hf:... | seqio:... | PREPARED_DIR, rate: 0.7, text_field: ..., format: ...}, ...]
    mixture: list = field(default_factory=list)
    tokenizer: str = "byte"  # byte | byte:VOCAB | a SentencePiece .model | a tokenizer.json | a saved tokenizer dir
    seq_len: int = 256
    batch_size: int = 16  # global batch, in rows of seq_len tokens
    val_fraction: float = 0.05  # share of documents (by stable hash of their name) held out
    max_docs: int = 0  # 0: all documents
    shuffle_seed: int = 0
    num_threads: int = 1  # grain read threads
    prefetch: int = 8  # batches prefetched by grain
    # Worker processes for the host transforms (packing, the objective's prepare, e.g. UL2's denoisers); 0: grain
    # threads in the trainer's process. Batches and checkpoints are the same either way.
    worker_processes: int = 0
    # A jsonl line that is not UTF-8 JSON with the text field, or a 64 KiB piece of a text file that is not UTF-8:
    # error (names file and byte offset) | skip (counted in a warning)
    malformed_lines: str = "error"
    # Instruction mixture (finetuning); non-empty replaces data.source:
    # [{source: FILE.jsonl | generated:TASK, rate: 1.0, template: zero_shot | few_shot | cot, shots: 3}, ...]
    instructions: list = field(default_factory=list)


@dataclass
class OptimizerConfig:
    """AdamW with a warmup and a decay schedule."""

    lr: float = 3e-3
    schedule: str = "cosine"  # cosine | wsd | constant
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # final lr = lr * min_lr_ratio (cosine, wsd)
    decay_fraction: float = 0.2  # wsd: share of steps spent decaying at the end
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0  # global-norm clipping; 0 disables


@dataclass
class MeshConfig:
    """Device mesh (data, fsdp, tensor); -1 takes the devices the others leave."""

    data: int = -1  # data, fsdp, tensor: sizes within one slice (ICI); with several slices, per slice
    fsdp: int = 1
    tensor: int = 1
    # Multislice: how many slices the data / fsdp axis spans over the data-center network (DCN); their product is
    # the number of slices (on CPU / GPU: processes). Each mesh axis is then dcn x ici, slices outermost. Tensor
    # parallelism never crosses DCN (MaxText: dcn_data_parallelism, dcn_fsdp_parallelism)
    dcn_data: int = 1
    dcn_fsdp: int = 1
    # Logical axis -> mesh axes, tried in order; a mesh axis already used by an earlier
    # dimension of the same array is skipped (T5X semantics). Empty: the default table.
    rules: list = field(default_factory=list)


@dataclass
class ObjectiveConfig:
    """Training objective; selecting one is ``objective=NAME`` (extra fields belong to one objective)."""

    name: str = "causal"
    heads: int = 2  # mtp: future tokens predicted; head i predicts token t+i
    head_weights: list = field(default_factory=list)  # mtp: per-head loss weights (empty: uniform)
    mixture: str = "ul2"  # ul2: denoiser preset, ul2 | ul2r
    denoisers: list = field(default_factory=list)  # ul2: [{kind, rate, mean_span, weight}, ...] replaces the preset
    examples_per_row: int = 1  # ul2: denoising examples packed per row, each its own segment


COMPILATION_CACHE_IN_RUN = "run"  # train.compilation_cache: <run_dir>/compilation_cache
COMPILATION_CACHE_NONE = "none"  # train.compilation_cache: no cache while the run trains


@dataclass
class TrainConfig:
    """The loop: length, evaluation, checkpoints, logging."""

    steps: int = 1000
    seed: int = 0
    run_dir: str = "runs/default"  # a new or empty directory, or an earlier run's (resumed); gs://... on a pod
    # A local run_dir that every host mounts from one shared filesystem (NFS, Filestore): allows several processes
    shared_filesystem: bool = False
    eval_every: int = 200  # 0: only at the end
    eval_batches: int = 8
    checkpoint_every: int = 200  # 0: only at the end
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    peak_flops_per_device: float = 0.0  # for MFU; 0: look up by device kind
    progress: bool = True
    # Project the final training loss from the curve so far (L = L_inf + (S_c/S)^α_S, refitted every 5% of the run
    # from 10% on): final≈X[lo,hi] in the progress postfix, projected_final_loss(_low/_high) in metrics rows
    project_loss: bool = True
    tensorboard: bool = True
    plot: bool = True
    # Non-finite loss or gradients: halt (stop, naming step, batch and tensor) | skip_batch (drop that update,
    # count it) | rollback (restore the last checkpoint, skip the data from it through the bad batch)
    nan_policy: str = "halt"
    max_rollbacks: int = 3  # rollback: halt after this many rollbacks to the same checkpoint
    # Refuse a model whose analytic per-device memory estimate exceeds the device's memory, before data loads and
    # the step compiles (false: skip the estimate; XLA still refuses a step that cannot fit when it compiles)
    check_memory: bool = True
    preemption_grace_s: float = 30.0  # SIGTERM: a checkpoint must be committed within this; warn if it took longer
    # Gradient noise scale (McCandlish et al.): each step's gradient is taken as two half-batches (same FLOPs) and
    # noise_grad_sq_small/big, noise_batch_small/big, noise_b_simple are logged; needs an even data.batch_size
    noise_scale: bool = False
    # jax.profiler trace of this many steps (0: none) after the first profile_skip (compilation, warm-up), written
    # under the run's TensorBoard directory so its profile tab shows it (MaxText: profiler_steps)
    profile_steps: int = 0
    profile_skip: int = 3
    # XLA's persistent compilation cache, so a resumed run reads its compiled programs back instead of compiling
    # them again: run (<run_dir>/compilation_cache) | none | a directory (local or gs://; e.g. one a sweep shares)
    compilation_cache: str = COMPILATION_CACHE_IN_RUN


@dataclass
class StageConfig:
    """Where a run starts: from scratch, or from a parent checkpoint (``scaling-jax continue --from``)."""

    name: str = "pretrain"  # label in the lineage: pretrain | ul2r | finetune | ...
    parent: str = ""  # checkpoint directory this stage starts from; '' = from scratch (set by `continue`)
    optimizer_state: str = "reset"  # reset: fresh AdamW state and warmup | continue: keep the parent's moments
    lr_from_parent: bool = False  # the new schedule peaks at the parent's final learning rate (replaces optimizer.lr)
    extend_vocab: bool = False  # grow the embedding to the tokenizer's vocabulary; new rows = the embedding mean


@dataclass
class BudgetConfig:
    """Length of a continuation stage; ``continue`` converts it to train.steps (all 0: keep train.steps)."""

    fraction: float = 0.0  # share of the parent's training FLOPs (U-PaLM's UL2R: ~0.1%)
    tokens: int = 0
    steps: int = 0


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    stage: StageConfig = field(default_factory=StageConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)


CHOICES: dict[str, tuple[str, ...]] = {
    "model.mlp": ("geglu", "swiglu"),
    "model.dtype": ("float32", "bfloat16"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.remat": ("none", "full", "minimal", "save_dots", "save_qkv_proj", "offload", "full_offload"),
    "model.attention": ("auto", "xla", "splash", "cudnn"),
    "model.position": ("rope", "t5_relative"),
    "model.logits_scale": ("none", "rsqrt_d_model"),
    "data.format": ("auto", "text", "jsonl", "parquet"),
    "optimizer.schedule": ("cosine", "wsd", "constant"),
    "objective.name": ("causal", "mtp", "ul2", "finetune"),
    "objective.mixture": ("ul2", "ul2r"),
    "stage.optimizer_state": ("reset", "continue"),
    "train.nan_policy": ("halt", "skip_batch", "rollback"),
    "data.malformed_lines": ("error", "skip"),
}

# Values older configs wrote for fields whose type has changed since (read as their new meaning).
LEGACY_VALUES: dict[str, dict[bool, str]] = {"model.remat": {True: "full", False: "none"}}
# Fields whose default changed after runs were saved without them: a saved run's config (config.yaml, a
# checkpoint's meta) that lacks one was trained with the value here, not with today's default.
SAVED_RUN_DEFAULTS: dict[str, Any] = {"model.scan_layers": False}


def fill_saved_run_defaults(raw: dict) -> dict:
    """A saved run's raw config with the fields it predates set to what it was trained with (in place)."""
    for dotted, value in SAVED_RUN_DEFAULTS.items():
        section, name = dotted.split(".")
        node = raw.get(section)
        if isinstance(node, dict) and name not in node:
            node[name] = value
    return raw


# ----------------------------------------------------------------------------- reading


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``['model.layers=4', 'objective=mtp']`` -> ``{'model.layers': 4, 'objective': 'mtp'}``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override '{item}' is not key=value; write e.g. model.layers=4")
        try:
            out[key.strip()] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:  # not YAML (a glob such as *.txt, a stray bracket): the text itself
            out[key.strip()] = raw
    return out


def _apply_override(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            child = node[part] = {"name": child}
        node = child
    last = parts[-1]
    if isinstance(node.get(last), dict) and not isinstance(value, dict):
        node[last]["name"] = value  # `objective=mtp` picks the section's `name`
    else:
        node[last] = value  # a scalar for a whole section is read as its `name` by _build


def _coerce(value: Any, typ: Any, where: str) -> Any:
    origin = typing.get_origin(typ) or typ
    if origin is bool:
        if isinstance(value, bool):
            return value
    elif origin is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif origin is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif origin is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
    elif origin is list:
        if isinstance(value, (list, tuple)):
            return [list(v) if isinstance(v, tuple) else v for v in value]
    else:
        return value
    name = getattr(origin, "__name__", str(origin))
    raise ConfigError(f"{where} must be {name}, got {value!r} ({type(value).__name__}); "
                      "fix the value in the YAML or override")


def _build(cls: type, raw: dict, prefix: str) -> Any:
    names = [f.name for f in dataclasses.fields(cls)]
    if not isinstance(raw, dict) and "name" in names:
        raw = {"name": raw}  # `objective: mtp` is short for `objective: {name: mtp}`
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping of keys, got {raw!r}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        where = f"{prefix}{key}"
        if where == "mesh.dcn_tensor":  # 1 (no tensor axis over DCN) is what every mesh does: accepted, ignored
            if value == 1 and type(value) is int:
                continue
            raise ConfigError(f"mesh.dcn_tensor={value!r} is not supported: tensor parallelism over DCN would run "
                              "its collectives (several per layer) over the slow data-center network; keep "
                              "mesh.tensor within a slice and span slices with mesh.dcn_data or mesh.dcn_fsdp")
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            raise ConfigError(f"unknown config key '{where}'; {hint}")
        typ = hints[key]
        if dataclasses.is_dataclass(typ):
            kwargs[key] = _build(typ, value, f"{where}.")
        else:
            if isinstance(value, bool) and where in LEGACY_VALUES:  # a field that used to be a bool
                value = LEGACY_VALUES[where][value]
            kwargs[key] = _coerce(value, typ, where)
            allowed = CHOICES.get(where)
            if allowed and kwargs[key] not in allowed:
                raise ConfigError(f"{where}={kwargs[key]!r} is not one of {', '.join(allowed)}")
    return cls(**kwargs)


def config_from_dict(raw: dict) -> Config:
    """Build and validate a Config from a plain nested dict (YAML contents + overrides)."""
    config = _build(Config, raw, "")
    apply_series(config.model, explicit=set((raw.get("model") or {}).keys()))
    byte = byte_vocab(config.data.tokenizer)
    if byte is not None:  # other tokenizers are read where they are built (``data.tokenizer.resolve_vocab``)
        if config.model.vocab_size == 0:
            config.model.vocab_size = byte
        check_vocab_holds(config.model.vocab_size, BYTE_TEXT_IDS, byte, config.data.tokenizer)
    validate(config)
    return config


BYTE_VOCAB = 384  # the byte tokenizer's default size: pad/bos/eos, 256 bytes, 3 UL2 mode tokens, 122 sentinels
BYTE_TEXT_IDS = 259  # pad/bos/eos and the 256 byte ids: what every row of byte-level data may hold


def byte_vocab(spec: str) -> int | None:
    """The vocabulary size of a ``byte`` / ``byte:VOCAB`` tokenizer spec (None for any other kind of tokenizer).

    Known without building anything, so parsing a config reads no tokenizer file and imports nothing."""
    kind, _, arg = str(spec).partition(":")
    if kind != "byte":
        return None
    try:
        return int(arg) if arg else BYTE_VOCAB
    except ValueError:
        raise ConfigError(f"data.tokenizer='{spec}': write 'byte' or 'byte:VOCAB_SIZE'") from None


def check_vocab_holds(vocab_size: int, needed: int, tokenizer_size: int, spec: str) -> None:
    """An explicit model.vocab_size must hold every id the data produces: text ids and pad/bos/eos (ids past
    the embedding would be clamped silently). A smaller one than the tokenizer's is legal: imported
    checkpoints lack the reserved ids until a continuation extends the vocabulary."""
    if 0 < vocab_size < needed:  # (objectives' own reserved ids: objectives.base.check_fresh_vocab)
        raise ConfigError(f"model.vocab_size={vocab_size} cannot hold the {needed} text and pad/bos/eos ids of "
                          f"data.tokenizer='{spec}'; set model.vocab_size={tokenizer_size} "
                          "or 0 (take it from the tokenizer)")


def read_yaml(path: str, label: str) -> Any:
    """A YAML file's contents ({} when empty); ``label`` names it in the one-line error for text that is not
    UTF-8 or not YAML."""
    try:
        return yaml.safe_load(paths.read_text(path)) or {}
    except UnicodeDecodeError:
        raise ConfigError(f"{label} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{label} is not valid YAML{where}; fix its syntax") from None


def load_config(path: str | None, overrides: list[str] | dict | None = None, saved_run: bool = False) -> Config:
    """Read a YAML file (or nothing: all defaults) and apply dotted overrides.

    ``saved_run``: the file is a run's own ``config.yaml``, so fields it predates take the values it was
    trained with (``SAVED_RUN_DEFAULTS``), not today's defaults."""
    raw: dict = {}
    if path:
        if not (paths.exists(path) if paths.is_remote(path) else os.path.isfile(path)):
            raise ConfigError(f"config file '{path}' does not exist; pass a YAML file such as configs/quickstart.yaml")
        raw = read_yaml(path, f"config file '{path}'")
        if not isinstance(raw, dict):
            raise ConfigError(f"config file '{path}' must hold a mapping of sections (model:, data:, ...)")
        if saved_run:
            fill_saved_run_defaults(raw)
    items = overrides if isinstance(overrides, dict) else parse_overrides(overrides or [])
    for key, value in items.items():
        _apply_override(raw, key, value)
    return config_from_dict(raw)


def to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def save_config(config: Config, path: str) -> None:
    """Write the resolved config atomically (a reader never sees half a file)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        yaml.safe_dump(to_dict(config), f, sort_keys=False)
    os.replace(tmp, path)


DEFAULTS_HEADER = "# Every knob with its default (generated from scaling_jax/config.py; a test keeps them equal).\n"


def write_defaults(path: str = "configs/defaults.yaml") -> None:
    """Regenerate the shipped defaults file from the dataclasses (run after adding a field)."""
    with open(path, "w") as f:
        f.write(DEFAULTS_HEADER)
        yaml.safe_dump(to_dict(Config()), f, sort_keys=False)


# ----------------------------------------------------------------------------- checks


def _positive(config: Config, *fields_: str) -> None:
    for dotted in fields_:
        section, name = dotted.split(".")
        value = getattr(getattr(config, section), name)
        if not value > 0:  # (NaN fails every comparison: test what must hold)
            raise ConfigError(f"{dotted} must be > 0, got {value}")
        if not math.isfinite(value):
            raise ConfigError(f"{dotted} must be a finite number > 0, got {value}")


def _check(dotted: str, value: Any, ok: bool, rule: str, fix: str = "") -> None:
    """``optimizer.b2=1.5 must be in [0, 1)`` (plus ``; fix``) unless ``ok``."""
    shown = repr(value) if isinstance(value, str) else value
    raise_it = not ok or (isinstance(value, float) and not math.isfinite(value))
    if raise_it:
        raise ConfigError(f"{dotted}={shown} must be {rule}" + (f"; {fix}" if fix else ""))


def _check_ranges(config: Config) -> None:
    """Single-field ranges (types were checked while building): every number and name that has a wrong value."""
    m, d, o, t, s = config.model, config.data, config.optimizer, config.train, config.stage
    for name in ("rope_theta", "norm_eps", "init_std"):
        _check(f"model.{name}", getattr(m, name), getattr(m, name) > 0, "> 0")
    _check_vocab_size(m)
    _check_data(d, "data.")
    for i, module in enumerate(d.seqio_modules):
        _check(f"data.seqio_modules[{i}]", module, isinstance(module, str) and bool(module.strip()),
               "a module name such as my_tasks.registry")
    _check("optimizer.b1", o.b1, 0.0 <= o.b1 < 1.0, "in [0, 1)")
    _check("optimizer.b2", o.b2, 0.0 <= o.b2 < 1.0, "in [0, 1)")
    _check("optimizer.eps", o.eps, o.eps > 0, "> 0", "AdamW divides by sqrt(v) + eps; use e.g. 1e-8")
    _check("optimizer.weight_decay", o.weight_decay, o.weight_decay >= 0, ">= 0", "0 disables it")
    _check("optimizer.clip_norm", o.clip_norm, o.clip_norm >= 0, ">= 0", "0 disables clipping")
    _check("train.seed", t.seed, t.seed >= 0, ">= 0")
    _check("train.peak_flops_per_device", t.peak_flops_per_device, t.peak_flops_per_device >= 0, ">= 0",
           "0 looks it up by device kind")
    _check("stage.name", s.name, bool(s.name.strip()) and "/" not in s.name and "\\" not in s.name,
           "a non-empty label without slashes", "e.g. ul2r or finetune")
    if sum(getattr(config.mesh, a) == -1 for a in ("data", "fsdp", "tensor")) > 1:
        raise ConfigError("only one of mesh.data, mesh.fsdp, mesh.tensor may be -1 (fill the remaining devices); "
                          "give the others sizes")


def _check_vocab_size(m: ModelConfig) -> None:
    _check("model.vocab_size", m.vocab_size, m.vocab_size >= 0, ">= 0",
           "give the tokenizer's size, or 0 to take it from data.tokenizer")


def _check_data(d: DataConfig, prefix: str) -> None:
    """Ranges of the data fields (``prefix``: ``data.`` or ``data.mixture[i].`` for a mixture entry)."""
    for name in ("source", "text_field", "source_split", "seqio_feature"):
        value = getattr(d, name)
        _check(f"{prefix}{name}", value, bool(value.strip()), "non-empty",
               "set data.source=stdlib, a file, a directory, a glob or hf:NAME" if name == "source" else "")
    _check(f"{prefix}max_docs", d.max_docs, d.max_docs >= 0, ">= 0", "0 reads every document")
    _check(f"{prefix}shuffle_seed", d.shuffle_seed, d.shuffle_seed >= 0, ">= 0")
    _check(f"{prefix}num_threads", d.num_threads, d.num_threads >= 1, ">= 1")
    _check(f"{prefix}prefetch", d.prefetch, d.prefetch >= 0, ">= 0", "0 disables prefetching")
    _check(f"{prefix}worker_processes", d.worker_processes, d.worker_processes >= 0, ">= 0",
           "0 runs the transforms in grain threads of the trainer's process")


def _check_data_lists(config: Config) -> None:
    """Values in ``data.mixture`` and ``data.instructions`` entries, checked now rather than when the data is read.

    Only values are checked here (a mixture entry's data fields by type, choice and range, every rate finite):
    the entries' shape and keys are the data layer's (``sources.source_components``, ``instructions``), which
    this layer may not import."""
    hints = typing.get_type_hints(DataConfig)
    for list_name in ("mixture", "instructions"):
        for i, entry in enumerate(getattr(config.data, list_name)):
            if not isinstance(entry, dict):
                continue
            where = f"data.{list_name}[{i}]"
            rate = entry.get("rate", 1.0)
            if isinstance(rate, (int, float)) and not isinstance(rate, bool):
                _check(f"{where}.rate", rate, rate > 0, "a finite number > 0 (a relative sampling rate)")
            if list_name == "mixture":
                fields_ = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in entry.items()
                           if k in hints and k not in ("mixture", "instructions")}
                for key, value in fields_.items():
                    allowed = CHOICES.get(f"data.{key}")
                    if allowed and value not in allowed:
                        raise ConfigError(f"{where}.{key}={value!r} is not one of {', '.join(allowed)}")
                _check_data(dataclasses.replace(config.data, mixture=[], **fields_), f"{where}.")


def validate(config: Config) -> None:
    """Cross-field checks that do not need devices (the mesh is checked when it is built)."""
    m, d, o, t = config.model, config.data, config.optimizer, config.train
    _positive(config, "model.layers", "model.d_model", "model.heads", "model.head_dim", "model.d_ff",
              "model.max_seq_len", "data.seq_len", "data.batch_size", "train.steps", "optimizer.lr",
              "train.eval_batches", "train.keep_checkpoints", "train.max_rollbacks",
              "train.preemption_grace_s")
    _check_ranges(config)
    kv = m.kv_heads or m.heads
    if m.kv_heads < 0 or m.heads % kv:
        raise ConfigError(f"model.kv_heads={m.kv_heads} must divide model.heads={m.heads} "
                          "(or be 0 for multi-head attention)")
    if m.cudnn_max_segments < 0:
        raise ConfigError(f"model.cudnn_max_segments={m.cudnn_max_segments} must be >= 0 (0: always the dense mask)")
    if m.head_dim % 2 and m.position == "rope":
        raise ConfigError(f"model.head_dim={m.head_dim} must be even for rotary embeddings")
    _validate_relative(config)
    if config.objective.name == "mtp":  # here, so a sweep refuses it before training any run
        check_mtp_layers(m.layers)
    if d.seq_len > m.max_seq_len:
        raise ConfigError(f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
                          "lower data.seq_len or raise model.max_seq_len")
    if not 0.0 <= d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in [0, 1)")
    if o.warmup_steps < 0 or o.warmup_steps > t.steps:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} must be in [0, train.steps={t.steps}]")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optimizer.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if not 0.0 < o.decay_fraction <= 1.0:
        raise ConfigError(f"optimizer.decay_fraction={o.decay_fraction} must be in (0, 1]")
    if t.noise_scale and d.batch_size % 2:
        raise ConfigError(f"train.noise_scale needs an even data.batch_size (got {d.batch_size}): the step splits "
                          "the batch into two halves; change data.batch_size or set train.noise_scale=false")
    if t.noise_scale and config.objective.name == "mtp" and config.objective.heads > 1:
        # Each head's loss is a mean over its own targets, whose counts differ between the halves by document
        # ends: one weight per half cannot recombine the halves into the full-batch gradient (measured 45% off).
        raise ConfigError("train.noise_scale measures one token-mean loss; objective=mtp with objective.heads="
                          f"{config.objective.heads} mixes one per head, so the two half-batch gradients do not "
                          "recombine exactly; measure the noise scale on the causal objective")
    for name in ("eval_every", "checkpoint_every"):
        if getattr(t, name) < 0:
            raise ConfigError(f"train.{name} must be >= 0 (0 means only at the end)")
    if t.profile_steps < 0 or t.profile_skip < 1:
        raise ConfigError(f"train.profile_steps={t.profile_steps} must be >= 0 and train.profile_skip="
                          f"{t.profile_skip} >= 1 (the first step compiles; profile the ones after it)")
    _check("train.compilation_cache", t.compilation_cache, bool(t.compilation_cache.strip()),
           "run, none or a directory", "train.compilation_cache=run")
    for axis in ("data", "fsdp", "tensor"):
        size = getattr(config.mesh, axis)
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{axis}={size} must be a positive size or -1 (fill the remaining devices)")
    for axis in ("dcn_data", "dcn_fsdp"):
        size = getattr(config.mesh, axis)
        _check(f"mesh.{axis}", size, size >= 1, "an integer >= 1 (the number of slices the axis spans; 1: none)")
    _validate_stage(config)
    for rule in config.mesh.rules:
        if not (isinstance(rule, list) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"mesh.rules entry {rule!r} must be [logical_axis, mesh_axis_or_list_or_null]")
        target = rule[1]
        if not (target is None or isinstance(target, str)
                or (isinstance(target, list) and all(isinstance(a, str) for a in target))):
            raise ConfigError(f"mesh.rules entry {rule!r} must map to a mesh axis name, a list of names or null")
    _check_data_lists(config)


def check_mtp_layers(layers: int) -> None:
    """Multi-token prediction turns the last layer into the per-head blocks, so it needs a trunk of at least one."""
    if layers < 2:
        raise ConfigError(f"model.layers={layers} must be >= 2 for objective=mtp (the last layer becomes the "
                          "per-head blocks)")


def _validate_relative(config: Config) -> None:
    """T5 relative-position buckets: half exact distances, half log-spaced out to a larger maximum distance."""
    m = config.model
    if m.position != "t5_relative":
        return
    _check("model.relative_buckets", m.relative_buckets, m.relative_buckets >= 2, ">= 2")
    _check("model.relative_max_distance", m.relative_max_distance, m.relative_max_distance > m.relative_buckets // 2,
           f"> model.relative_buckets // 2 = {m.relative_buckets // 2}", "the log-spaced buckets span the distances "
           "between the exact ones and this maximum (T5's default is 128 with 32 buckets)")
    if config.objective.name == "mtp":
        raise ConfigError("objective=mtp does not support model.position=t5_relative yet (its head-by-head backward "
                          "differentiates only the RoPE model's parameters); use objective=causal or ul2")


def _validate_stage(config: Config) -> None:
    """Budget and parent-only stage options make sense only for a continuation (``scaling-jax continue``)."""
    b, s = config.budget, config.stage
    given = [f"budget.{k}" for k in ("fraction", "tokens", "steps") if getattr(b, k)]
    _check("budget.fraction", b.fraction, 0 <= b.fraction <= 1, "in [0, 1] (a share of the parent's training "
           "FLOPs)", "for a longer stage give budget.tokens or budget.steps")
    for name in ("tokens", "steps"):
        _check(f"budget.{name}", getattr(b, name), getattr(b, name) >= 0, ">= 0", "0 leaves it unset")
    if len(given) > 1:
        raise ConfigError(f"{' and '.join(given)} are both set; give the stage budget one way")
    if s.parent:
        parent = s.parent.rstrip("/")
        _check("stage.parent", s.parent, paths.basename(parent).isdigit(), "a checkpoint directory RUN_DIR/.../STEP",
               "start a stage with `scaling-jax continue --from RUN_DIR`, which sets it")
    else:
        used = given + [f"stage.{k}" for k in ("lr_from_parent", "extend_vocab") if getattr(s, k)]
        used += ["stage.optimizer_state=continue"] if s.optimizer_state == "continue" else []
        if used:
            raise ConfigError(f"{used[0]} applies to a continuation; run `scaling-jax continue --from RUN_DIR "
                              "--stage STAGE.yaml` (or set train.steps for a run from scratch)")
