"""The ``scaling_jax`` model type for EleutherAI's lm-evaluation-harness (``pip install 'scaling_jax[lm-eval]'``).

lm-eval finds model types in its registry (``lm_eval.api.registry.model_registry``), which it fills from its
own ``lm_eval.models`` only; it loads no entry points for models, so its stock ``lm_eval`` command cannot see
an outside package's model. Importing this module registers ``scaling_jax`` (Python API), and running it
is the ``lm_eval`` command with the model registered first::

    python -m scaling_jax.eval.lm_eval_adapter --model scaling_jax --model_args run_dir=RUN[,step=N] \\
        --tasks lambada_openai,hellaswag --batch_size 32

Every flag after the module name is lm-eval's own (``run`` / ``ls`` / ``validate`` subcommands included).

The three request types run on the run's ``CachedLM`` (``harness.load_run``), batched:

- ``loglikelihood``: one teacher-forced forward per batch gives each continuation's summed log-probability
  and whether greedy decoding would produce it (argmax at every continuation position). Context and
  continuation are split as lm-eval splits them for its own causal models (``TemplateLM._encode_pair``: the
  context's trailing whitespace is scored with the continuation, and the pair is encoded whole), after BOS.
  A context longer than ``max_length`` loses its oldest tokens.
- ``loglikelihood_rolling``: BOS + the whole text, cut into lm-eval's rolling windows of ``max_length``
  tokens (every token predicted once, each window with the most context that fits), summed.
- ``generate_until``: ``CachedLM.generate_ids`` (KV cache over left-padded batches) with the request's
  ``until`` stop strings, ``max_gen_toks``, and ``do_sample`` / ``temperature`` / ``top_k`` / ``top_p``;
  requests are grouped by their generation settings.

``max_length`` defaults to the ``data.seq_len`` the run was trained on (the model has no hard limit, but
positions beyond its training length were never trained); ``max_gen_toks`` (a task's own wins) to lm-eval's 256
or half of ``max_length``, whichever is smaller. A generation budget that leaves no room for the prompt is
refused, as lm-eval's own models refuse it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import sys
from collections.abc import Sequence

from scaling_jax import paths
from scaling_jax.errors import CheckpointError, DataError, UserError
from scaling_jax.run_dir import CHECKPOINT_DIR, CONFIG_FILE

# JAX, NumPy and lm-eval's model base class load where they are first needed (the ``ScalingJaxLM`` class is
# made on first access), so the command line can refuse a bad run directory before seconds of imports.
logger = logging.getLogger(__name__)

NEEDS_LM_EVAL = ("the lm-eval adapter needs lm-evaluation-harness: pip install 'scaling_jax[lm-eval]' "
                 "(or pip install lm-eval)")
MODEL_NAME = "scaling_jax"
CLASS_NAME = "ScalingJaxLM"
MODEL_ALIASES = (MODEL_NAME, "scaling-jax")
DEFAULT_BATCH_SIZE = 32
DEFAULT_MAX_GEN_TOKS = 256
# lm-eval adds these to every model's arguments; ``device`` is JAX's to choose here, the rest have no meaning.
IGNORED_ARGS = ("device", "max_batch_size", "trust_remote_code")


def _bucket(n: int, size: int = 128) -> int:
    """Round a length up so a few shapes compile, not one per request (as ``model.decode`` does)."""
    return max(size, -(-n // size) * size)


def _rows(n: int, cap: int) -> int:
    """Rows a batch of ``n`` is padded to: the next power of two, at most ``cap`` (fewer compiled shapes)."""
    return min(cap, 1 << (n - 1).bit_length())


class _Scorer:
    """Teacher-forced scoring of many (context, continuation) token rows: one jitted forward per batch returns,
    at every position, the log-probability of the next token and whether it is the argmax."""

    def __init__(self, lm, batch_size: int):
        import jax

        self.graphdef, self.state = lm.graphdef, lm.state
        self.pad_id = lm.tokenizer.pad_id
        self.batch_size = batch_size
        self._forward = jax.jit(self._logp_and_greedy)  # ``self`` (the graph) is static: one trace per shape

    def _logp_and_greedy(self, state, tokens, positions, segment_ids):
        import jax
        import jax.numpy as jnp
        from flax import nnx

        from scaling_jax.model.decode import full_logits

        logits = full_logits(nnx.merge(self.graphdef, state), tokens, positions, segment_ids).astype(jnp.float32)
        targets = jnp.concatenate([tokens[:, 1:], tokens[:, :1]], axis=1)  # position t predicts token t + 1
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), targets[..., None], axis=-1)[..., 0]
        return logp, jnp.argmax(logits, axis=-1) == targets

    def score(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]], progress=None) -> list[tuple[float, bool]]:
        """``(sum of log-probabilities, greedy)`` of each continuation after its context (context non-empty)."""
        import jax.numpy as jnp
        import numpy as np

        out: list[tuple[float, bool] | None] = [None] * len(rows)
        order = sorted(range(len(rows)), key=lambda i: -(len(rows[i][0]) + len(rows[i][1])))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            seqs = [list(rows[i][0]) + list(rows[i][1]) for i in chunk]
            length = _bucket(max(len(s) for s in seqs))
            tokens = np.full((_rows(len(chunk), self.batch_size), length), self.pad_id, np.int32)
            seg = np.zeros(tokens.shape, np.int32)
            for r, s in enumerate(seqs):
                tokens[r, :len(s)], seg[r, :len(s)] = s, 1
            positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
            logp, greedy = (np.asarray(a) for a in self._forward(self.state, jnp.asarray(tokens),
                                                                   jnp.asarray(positions), jnp.asarray(seg)))
            for r, i in enumerate(chunk):
                ctx, cont = len(rows[i][0]), len(rows[i][1])
                where = slice(ctx - 1, ctx + cont - 1)
                out[i] = (float(np.sum(logp[r, where], dtype=np.float64)), bool(greedy[r, where].all()))
            if progress is not None:
                progress.update(len(chunk))
        return out  # type: ignore[return-value]


def _int_arg(flag: str, value, low: int) -> int:
    """An integer setting (lm-eval hands ``--model_args`` values over as int or str)."""
    text = str(value).strip()
    if isinstance(value, bool) or not (isinstance(value, int) or text.lstrip("-").isdigit()) or int(text) < low:
        raise UserError(f"{flag}={value!r}: need an integer >= {low}")
    return int(text)


def _check_run_dir(run_dir: str) -> None:
    """``run_dir`` has ``config.yaml`` and ``checkpoints/`` (cheap: no JAX, no lm-eval)."""
    if not paths.exists(paths.join(run_dir, CONFIG_FILE)) or not paths.isdir(paths.join(run_dir, CHECKPOINT_DIR)):
        raise CheckpointError(f"--model_args run_dir='{run_dir}' is not a scaling_jax run directory (needs "
                              f"{CONFIG_FILE} and {CHECKPOINT_DIR}/); pass the train.run_dir of a trained run")


class _ScalingJaxLMMethods:
    """The body of ``ScalingJaxLM`` (which is this plus lm-eval's ``LM`` base, made on first access)."""

    def __init__(self, run_dir: str | None = None, step=None, batch_size=None, max_length=None,
                 max_gen_toks=None, seed=0, **kwargs):
        super().__init__()
        unknown = sorted(k for k in kwargs if k not in IGNORED_ARGS)
        if unknown:
            raise UserError(f"unknown --model_args {', '.join(unknown)} for --model {MODEL_NAME}; it takes run_dir, "
                            "step, max_length, max_gen_toks and seed")
        if not run_dir:
            raise UserError(f"--model {MODEL_NAME} needs --model_args run_dir=RUN_DIR[,step=N]: the train.run_dir "
                            "of a trained run")
        from scaling_jax.config import load_config
        from scaling_jax.eval.harness import load_run
        from scaling_jax.paths import join

        step = None if step is None else _int_arg("--model_args step", step, 0)
        max_length = None if max_length is None else _int_arg("--model_args max_length", max_length, 2)
        given_gen_toks = None if max_gen_toks is None else _int_arg("--model_args max_gen_toks", max_gen_toks, 1)
        self.seed = _int_arg("--model_args seed", seed, 0)
        auto = batch_size is None or str(batch_size).startswith("auto")
        self.batch_size = DEFAULT_BATCH_SIZE if auto else _int_arg("--batch_size", batch_size, 1)
        run_dir = str(run_dir)
        _check_run_dir(run_dir)
        self.run = load_run(run_dir, step)
        self.lm = self.run.lm
        self.tokenizer = self.lm.tokenizer
        self.max_length = max_length or load_config(join(run_dir, CONFIG_FILE)).data.seq_len
        # lm-eval's default (256) would fill a small model's whole window (seq_len 256) and every generation
        # task would be refused: by default at most half the window answers, as CachedLM.generate leaves it
        self.max_gen_toks = given_gen_toks or min(DEFAULT_MAX_GEN_TOKS, self.max_length // 2)
        logger.info("scaling_jax: %s step %d (%s non-embedding parameters), max_length %d, batch %d", self.run.run_dir,
                    self.run.step, f"{self.run.n_params:,}", self.max_length, self.batch_size)
        self._scorer = _Scorer(self.lm, self.batch_size)

    # ------------------------------------------------------------------------- lm-eval's interface

    @property
    def tokenizer_name(self) -> str:
        return f"scaling_jax:{self.tokenizer.fingerprint()}"

    def _progress(self, total: int, desc: str, disable: bool):
        from tqdm import tqdm

        return tqdm(total=total, desc=desc, disable=disable or self.rank != 0)

    def _pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Token rows split as lm-eval splits them (``TemplateLM._encode_pair``): the context's trailing whitespace
        moves to the continuation, the pair is encoded whole and cut after the context's tokens; BOS first, as the
        run trained. An over-long context keeps its newest tokens."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        ctx = self.lm.encode_prompt(context)
        cont = [int(t) for t in self.tokenizer.encode(context + continuation)][len(ctx) - 1:]
        if len(cont) > self.max_length:
            raise DataError(f"a continuation of {len(cont)} tokens exceeds max_length={self.max_length}; raise "
                            "--model_args max_length or use a loglikelihood_rolling task")
        keep = self.max_length + 1 - len(cont)  # the model reads ctx + cont minus its last token
        return ctx[-keep:] if len(ctx) > keep else ctx, cont

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        rows = [self._pair(*req.args) for req in requests]
        out = [(0.0, True)] * len(rows)
        scored = [i for i, (_, cont) in enumerate(rows) if cont]  # an empty continuation has probability 1
        with self._progress(len(scored), "scaling_jax loglikelihood", disable_tqdm) as bar:
            for i, res in zip(scored, self._scorer.score([rows[i] for i in scored], bar), strict=True):
                out[i] = res
        for req, res in zip(requests, out, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return out

    def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
        """lm-eval's disjoint rolling windows over BOS + ``text``: (context, predicted tokens) pairs."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        tokens = [int(t) for t in self.tokenizer.encode(text)]
        return [make_disjoint_window(w) for w in get_rolling_token_windows(
            token_list=tokens, prefix_token=self.tokenizer.bos_id, max_seq_len=self.max_length, context_len=1)]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows = [self.rolling_windows(req.args[0]) for req in requests]
        flat = [w for ws in windows for w in ws]
        with self._progress(len(flat), "scaling_jax loglikelihood_rolling", disable_tqdm) as bar:
            scores = self._scorer.score(flat, bar)
        out, at = [], 0
        for req, ws in zip(requests, windows, strict=True):
            out.append(float(sum(s for s, _ in scores[at:at + len(ws)])))
            at += len(ws)
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, out[-1])
        return out

    def sampling(self, gen_kwargs: dict):
        """``SamplingConfig`` of one request's generation settings (lm-eval's names)."""
        from scaling_jax.model.decode import SamplingConfig

        kw = dict(gen_kwargs or {})
        until = kw.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = _int_arg("generation setting max_gen_toks", kw.pop("max_gen_toks", self.max_gen_toks), 1)
        do_sample = bool(kw.pop("do_sample", False))
        temperature = float(kw.pop("temperature", 1.0 if do_sample else 0.0) or 0.0)
        top_k = int(kw.pop("top_k", 0) or 0)
        top_p = float(kw.pop("top_p", 1.0) or 1.0)
        if kw:
            logger.warning("scaling_jax: generation settings %s are not supported and are ignored", sorted(kw))
        if not do_sample:
            temperature, top_k, top_p = 0.0, 0, 1.0
        try:
            return SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p, max_new_tokens=max_new,
                                  stop=tuple(s for s in until if s), seed=self.seed)
        except ValueError as e:
            raise UserError(f"generation settings {gen_kwargs}: {e}") from None

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        with self._progress(len(requests), "scaling_jax generate_until", disable_tqdm) as bar:
            for members in groups.values():
                sampling = self.sampling(requests[members[0]].args[1])
                keep = self.max_length - sampling.max_new_tokens  # context left for the prompt
                if keep < 1:  # lm-eval's own models refuse this too; a prompt cut to one token answers nothing
                    raise UserError(f"generation asks for max_gen_toks={sampling.max_new_tokens} new tokens but "
                                    f"max_length is {self.max_length}, leaving no room for the prompt; set "
                                    "max_gen_toks lower (the task's generation_kwargs or --model_args "
                                    "max_gen_toks=...) or raise --model_args max_length")
                prompts = {i: self.lm.encode_prompt(requests[i].args[0])[-keep:] for i in members}
                members = sorted(members, key=lambda i: -len(prompts[i]))
                for start in range(0, len(members), self.batch_size):
                    chunk = members[start:start + self.batch_size]
                    # each request samples from its own stream (seed folded with its index): the same whatever
                    # --batch_size groups it with
                    texts = self.lm.generate_ids([prompts[i] for i in chunk], sampling, request_ids=chunk).texts
                    for i, text in zip(chunk, texts, strict=True):
                        out[i] = text
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                    bar.update(len(chunk))
        return out  # type: ignore[return-value]


def _make_class() -> type:
    """``ScalingJaxLM``: lm-eval's ``LM`` base class with the methods above (imports lm-eval's model API)."""
    try:
        from lm_eval.api.model import LM
    except ImportError as e:  # pragma: no cover - exercised only where lm-eval is missing
        raise UserError(NEEDS_LM_EVAL) from e

    class ScalingJaxLM(_ScalingJaxLMMethods, LM):
        """A ``scaling_jax`` run directory as an lm-eval model: ``--model_args run_dir=RUN[,step=N][,max_length=L]
        [,max_gen_toks=T][,seed=S]``; ``--batch_size`` sets the rows per forward (``auto``: 32)."""

    ScalingJaxLM.__qualname__ = CLASS_NAME  # importable as scaling_jax.eval.lm_eval_adapter:ScalingJaxLM
    return ScalingJaxLM


def __getattr__(name: str):
    """``ScalingJaxLM`` is made once, on first access (``adapter.ScalingJaxLM``, lm-eval's lazy registry entry)."""
    if name == CLASS_NAME:
        globals()[CLASS_NAME] = cls = _make_class()
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register() -> None:
    """Add ``scaling_jax`` (and ``scaling-jax``) to lm-eval's model registry; idempotent.

    lm-eval imports its built-in models only into an empty registry, so they are imported first; the entry is
    a lazy ``module:Class`` reference, so running this file as ``__main__`` registers the importable class (and
    neither JAX nor lm-eval's model API loads before lm-eval resolves it)."""
    try:
        import lm_eval.models  # noqa: F401  (the built-in model types, before the registry stops being empty)
        from lm_eval.api.registry import model_registry
    except ImportError as e:  # pragma: no cover - exercised only where lm-eval is missing
        raise UserError(NEEDS_LM_EVAL) from e

    for name in MODEL_ALIASES:
        if name not in model_registry:
            model_registry.register(name, target=f"scaling_jax.eval.lm_eval_adapter:{CLASS_NAME}")


if __name__ != "__main__":  # run as a program, ``main`` registers once it has checked its arguments
    register()


def _run_dir_arg(argv: Sequence[str]) -> str | None:
    """The ``run_dir`` of a ``--model scaling_jax`` evaluation's ``--model_args`` on the command line, where it is
    plainly there (``key=value`` pairs, no JSON); ``None`` otherwise (lm-eval parses and the model checks)."""
    if not argv or (argv[0] != "run" and not argv[0].startswith("-")) or {"-h", "--help"} & set(argv):
        return None
    model, found, i = None, [], 0
    while i < len(argv):
        flag, eq, value = argv[i].partition("=")
        if flag in ("--model", "-M"):
            model = value if eq else (argv[i + 1] if i + 1 < len(argv) else None)
        elif flag in ("--model_args", "-a"):
            values = [value] if eq else []
            while not eq and i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                i += 1
                values.append(argv[i])
            for text in values:
                if text.lstrip().startswith("{"):
                    return None
                found += [item.partition("=")[2].strip() for item in text.split(",")
                          if item.partition("=")[0].strip() == "run_dir"]
        i += 1
    return found[0] if model in MODEL_ALIASES and len(found) == 1 and found[0] else None


NO_DEFAULT_TASKS = "--no_default_tasks"


@contextlib.contextmanager
def _without_default_tasks(skip: bool):
    """While the block runs, lm-eval's ``TaskManager`` indexes only ``--include_path``, not the ~15k task files
    it ships (about 14 s of every start on the 2-core development machine). For tasks that come whole from
    ``--include_path``; a task or group that names a built-in task then is not found."""
    if not skip:
        yield
        return
    import lm_eval.tasks

    base = lm_eval.tasks.TaskManager

    class IncludePathOnly(base):
        def __init__(self, *args, **kwargs):
            kwargs["include_defaults"] = False
            super().__init__(*args, **kwargs)

    lm_eval.tasks.TaskManager = IncludePathOnly  # looked up there each time lm-eval's command makes one
    try:
        yield
    finally:
        lm_eval.tasks.TaskManager = base


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (``lm_eval.__main__.cli_evaluate``) with ``--model scaling_jax`` registered; a
    ``UserError`` (bad ``--model_args``, not a run directory) ends it with one ``error:`` line and exit 2 (a
    run directory on the command line is checked first, before lm-eval, its tasks and JAX load).
    ``--no_default_tasks`` (ours, taken off before lm-eval parses) skips indexing lm-eval's built-in tasks."""
    args = list(sys.argv[1:] if argv is None else argv)
    skip_defaults = NO_DEFAULT_TASKS in args
    args = [a for a in args if a != NO_DEFAULT_TASKS]
    try:
        given = {a.partition("=")[0] for a in args}
        if skip_defaults and not given & {"--include_path", "--config", "-C"}:  # a config file may name the path
            raise UserError(f"{NO_DEFAULT_TASKS} leaves only --include_path's tasks: pass --include_path DIR")
        run_dir = _run_dir_arg(args)
        if run_dir is not None:
            _check_run_dir(run_dir)
        register()
        from lm_eval.__main__ import cli_evaluate

        sys.argv = [sys.argv[0] if argv is None else "lm-eval", *args]
        with _without_default_tasks(skip_defaults):
            cli_evaluate()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
