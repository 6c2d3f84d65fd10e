"""UL2 Mixture-of-Denoisers (Tay et al. 2022, arXiv 2205.05131) for decoder-only models.

A host-side numpy transform turns packed rows into prefix-LM examples, plus the loss.

Each example is a chunk of ``n`` consecutive raw tokens of the row (it may cross document
boundaries, as T5 span corruption does). A denoiser sampled from the mixture turns the chunk
into ``inputs`` and ``targets``:

* R / X (span corruption, T5 ``random_spans_noise_mask`` + ``noise_span_to_unique_sentinel``):
  inputs = the chunk with noise span i replaced by sentinel i; targets = sentinel i followed
  by noise span i, for every span in order.
* S (sequential, T5 ``random_prefix_noise_mask``): inputs = a random prefix, targets = the rest.

Layout of one example (``P = 1 + len(inputs)``, ``L = P + len(targets) + 1``)::

    sequence      = [mode] + inputs + targets + [eos]          # eos ends the targets, as in T5
    model inputs  = sequence[:-1]   (L - 1 slots of the row)
    model targets = sequence[1:]
    bidirectional = slots 0 .. P-1            ([mode] + inputs: full attention among themselves)
    loss_mask     = slots P-1 .. L-2          (slots whose target is in targets + [eos])

Slots ``0 .. P-1`` attend to each other fully; slots from ``P`` on are causal (they see the
whole prefix and the targets before them). Examples of a row get segment ids 1, 2, ... and
positions restarting at 0; the tail is padding (pad id, segment 0, no loss). An R/X example
of ``n`` raw tokens with ``k`` noise spans takes ``n + 2k + 1`` slots, an S example ``n + 1``;
``max_raw_tokens`` picks the largest ``n`` whose corrupted example fits the slots left.

Randomness is stateless: every row seeds its own generator with the crc32 of its tokens, so
a batch is a pure function of its rows (exact resume, any host count).
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import jax
import numpy as np

from scaling_jax.config import ObjectiveConfig
from scaling_jax.data.tokenizer import ByteTokenizer, Tokenizer
from scaling_jax.errors import ConfigError
from scaling_jax.objectives.base import Batch, Metrics, ObjectiveBase, masked_cross_entropy

MODE_BY_KIND = {"R": "[NLU]", "X": "[NLG]", "S": "[S2S]"}  # UL2 paradigm tokens (Tay et al. 2022, §3.1.3)
MIN_EXAMPLE_TOKENS = 8  # raw tokens below which a row's leftover slots are padded instead of used


@dataclass(frozen=True)
class Denoiser:
    """One UL2 denoiser.

    ``rate``: R/X: share of tokens corrupted (T5 ``noise_density``); S: T5's prefix-LM density,
    the prefix length being uniform in ``[round((1 - 2 rate)(n - 1)), n - 1]`` (0.5: any split).
    ``mean_span``: R/X mean noise span length (T5 ``mean_noise_span_length``); unused for S.
    """

    kind: str
    rate: float
    mean_span: float = 0.0
    weight: float = 1.0

    @property
    def mode(self) -> str:
        return MODE_BY_KIND[self.kind]


def _R(rate: float, span: float, weight: float = 1.0) -> Denoiser:  # noqa: N802
    return Denoiser("R", rate, span, weight)


def _X(rate: float, span: float, weight: float = 1.0) -> Denoiser:  # noqa: N802
    return Denoiser("X", rate, span, weight)


# UL2 paper Table 1: R (0.15, 3), (0.15, 8); X (0.5, 3), (0.5, 8), (0.15, 64), (0.5, 64); S.
# The paper's per-denoiser sampling weights are not in our references, so the 7 are uniform.
UL2_MIXTURE: tuple[Denoiser, ...] = (_R(0.15, 3), _R(0.15, 8), _X(0.5, 3), _X(0.5, 8), _X(0.15, 64),
                                     _X(0.5, 64), Denoiser("S", 0.5))

# U-PaLM (Tay et al. 2022, arXiv 2210.11399, §2.3): 50% S, 25% R (rate 0.15, span 3), 25% X,
# where X is "mean span 32 or corruption up to 50%": both variants, (0.15, 32) and (0.5, 3), 12.5% each.
UL2R_MIXTURE: tuple[Denoiser, ...] = (Denoiser("S", 0.5, weight=0.5), _R(0.15, 3, 0.25), _X(0.15, 32, 0.125),
                                      _X(0.5, 3, 0.125))

PRESETS = {"ul2": UL2_MIXTURE, "ul2r": UL2R_MIXTURE}


# ----------------------------------------------------------------------------- config


def _number(entry: dict, key: str, where: str, default: float | None = None) -> float:
    if key not in entry:
        if default is None:
            raise ConfigError(f"{where}.{key} is missing; give it a number")
        return default
    value = entry[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where}.{key} must be a number, got {value!r}")
    return float(value)


def denoiser_from_dict(entry, i: int) -> Denoiser:
    """One ``objective.denoisers`` entry -> Denoiser; errors name ``objective.denoisers[i].field``."""
    where = f"objective.denoisers[{i}]"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where} must be a mapping such as {{kind: R, rate: 0.15, mean_span: 3}}, got {entry!r}")
    unknown = sorted(set(entry) - {"kind", "rate", "mean_span", "weight"})
    if unknown:
        raise ConfigError(f"{where}.{unknown[0]} is not a denoiser field; use kind, rate, mean_span, weight")
    kind = entry.get("kind")
    if kind not in MODE_BY_KIND:
        raise ConfigError(f"{where}.kind={kind!r} must be one of R, X, S")
    weight = _number(entry, "weight", where, 1.0)
    if weight < 0:
        raise ConfigError(f"{where}.weight={weight} must be >= 0")
    if kind == "S":
        if "mean_span" in entry:
            raise ConfigError(f"{where}.mean_span does not apply to an S (prefix-LM) denoiser; remove it")
        rate = _number(entry, "rate", where, 0.5)
        if not 0.0 < rate <= 0.5:
            raise ConfigError(f"{where}.rate={rate} must be in (0, 0.5] for an S denoiser (T5 prefix-LM density)")
        return Denoiser("S", rate, 0.0, weight)
    rate = _number(entry, "rate", where)
    if not 0.0 < rate < 1.0:
        raise ConfigError(f"{where}.rate={rate} must be in (0, 1)")
    span = _number(entry, "mean_span", where)
    if span < 1.0:
        raise ConfigError(f"{where}.mean_span={span} must be >= 1")
    return Denoiser(kind, rate, span, weight)


def mixture_from_config(cfg: ObjectiveConfig) -> tuple[Denoiser, ...]:
    """``objective.denoisers`` if given, else the ``objective.mixture`` preset."""
    if cfg.denoisers:
        mixture = tuple(denoiser_from_dict(entry, i) for i, entry in enumerate(cfg.denoisers))
    elif cfg.mixture in PRESETS:
        mixture = PRESETS[cfg.mixture]
    else:
        raise ConfigError(f"objective.mixture={cfg.mixture!r} is not one of {', '.join(PRESETS)}")
    if sum(d.weight for d in mixture) <= 0:
        raise ConfigError("objective.denoisers weights sum to 0; give at least one denoiser a positive weight")
    return mixture


# ----------------------------------------------------------------------------- noise (T5 math)


def span_counts(length, rate: float, mean_span: float):
    """(noise tokens, noise spans) for a length, as T5 ``random_spans_noise_mask`` computes them.

    num_noise = round(length * rate) clipped to [1, length - 1]; num_spans = max(1, round(num_noise
    / mean_span)), also capped at the non-noise count so every span stays non-empty for tiny lengths
    (T5 leaves that case undefined). Works on ints or integer arrays (``length >= 2``).
    """
    if isinstance(length, int):  # the per-example path: plain Python, same (half-to-even) rounding
        noise = min(max(round(length * rate), 1), length - 1)
        return noise, min(max(1, round(noise / mean_span)), length - noise)
    length = np.asarray(length, dtype=np.int64)
    noise = np.clip(np.rint(length * rate).astype(np.int64), 1, length - 1)
    spans = np.maximum(1, np.rint(noise / mean_span).astype(np.int64))
    return noise, np.minimum(spans, length - noise)


def random_cuts(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted cut points (in 1 .. total-1) splitting ``total`` items into ``parts`` non-empty segments.

    The ``parts - 1`` gaps holding the smallest of iid uniforms form a uniformly random subset, so
    the segment lengths are uniform over compositions: the distribution of T5's ``_random_segmentation``.
    O(total) with ``np.partition`` (no sort).
    """
    if parts <= 1:
        return np.zeros(0, dtype=np.int64)
    keys = rng.random(total - 1)
    return np.flatnonzero(keys <= np.partition(keys, parts - 2)[parts - 2]) + 1


def random_partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Lengths of a uniformly random split of ``total`` items into ``parts`` non-empty segments."""
    return np.diff(np.concatenate([[0], random_cuts(total, parts, rng), [total]]))


def random_spans_noise_mask(length: int, rate: float, mean_span: float, rng: np.random.Generator) -> np.ndarray:
    """bool[length]: T5 span-corruption noise mask (Raffel et al. 2020, ``random_spans_noise_mask``).

    Alternating non-noise / noise spans, starting with non-noise, as many of each; each set of
    lengths a uniformly random partition of its token count. Built from the span boundaries:
    noise span i starts after non-noise spans 0..i and noise spans 0..i-1.
    """
    if length < 2:
        raise ValueError(f"span corruption needs length >= 2, got {length}")
    noise, spans = (int(v) for v in span_counts(length, rate, mean_span))
    clear_ends = np.append(random_cuts(length - noise, spans, rng), length - noise)  # cumulative, per span
    noise_cuts = random_cuts(noise, spans, rng)
    starts = clear_ends + np.insert(noise_cuts, 0, 0)
    ends = clear_ends + np.append(noise_cuts, noise)
    delta = np.zeros(length + 1, dtype=np.int8)
    delta[starts] = 1
    delta[ends] -= 1
    return np.cumsum(delta[:length], dtype=np.int8).astype(bool)


def random_prefix_length(length: int, rate: float, rng: np.random.Generator) -> int:
    """S-denoiser split point, T5 ``random_prefix_noise_mask``: uniform in [lo, length - 1].

    lo = round((1 - 2 rate)(length - 1)) (0 at the UL2/T5 density 0.5), raised to 1 as T5's code
    does so the prefix is never empty when the chunk has two or more tokens.
    """
    hi = length - 1
    lo = min(hi, max(1, round((1.0 - 2.0 * rate) * hi)))
    return int(rng.integers(lo, hi + 1))


def spans_to_sentinels(tokens: np.ndarray, mask: np.ndarray, sentinels: np.ndarray) -> np.ndarray:
    """Replace the i-th run of ``mask`` by ``sentinels[i]`` (T5 ``noise_span_to_unique_sentinel``)."""
    starts = mask.copy()
    starts[1:] &= ~mask[:-1]
    span = np.maximum(np.cumsum(starts) - 1, 0)
    out = np.where(mask, sentinels[span], tokens)
    return out[~mask | starts]


def corrupt(tokens: np.ndarray, denoiser: Denoiser, rng: np.random.Generator,
            sentinels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(inputs, targets) of one raw chunk under a denoiser; ``sentinels[i]`` is the id of sentinel i."""
    if denoiser.kind == "S":
        split = random_prefix_length(tokens.size, denoiser.rate, rng)
        return tokens[:split], tokens[split:]
    mask = random_spans_noise_mask(tokens.size, denoiser.rate, denoiser.mean_span, rng)
    # The mask starts with non-noise and alternates, so non-noise span i gets sentinel i in the
    # targets: sentinel i then precedes noise span i, exactly as it replaced it in the inputs.
    return spans_to_sentinels(tokens, mask, sentinels), spans_to_sentinels(tokens, ~mask, sentinels)


# ----------------------------------------------------------------------------- layout


def example_slots(denoiser: Denoiser, n) -> np.ndarray:
    """Row slots an example of ``n`` raw tokens takes: [mode] + inputs + targets + [eos], minus the shift."""
    n = np.asarray(n, dtype=np.int64)
    if denoiser.kind == "S":
        return n + 1
    return n + 2 * span_counts(n, denoiser.rate, denoiser.mean_span)[1] + 1


@functools.lru_cache(maxsize=4096)
def max_raw_tokens(denoiser: Denoiser, slots: int, num_sentinels: int) -> int:
    """The most raw tokens whose corrupted example fits ``slots`` with at most ``num_sentinels`` spans (0: none)."""
    n = np.arange(2, slots + 1)
    ok = example_slots(denoiser, n) <= slots
    if denoiser.kind != "S":
        ok &= span_counts(n, denoiser.rate, denoiser.mean_span)[1] <= num_sentinels
    return int(n[ok].max()) if ok.any() else 0


@dataclass(frozen=True)
class TokenIds:
    """The special ids the layout needs, looked up once from the tokenizer."""

    pad: int
    eos: int
    modes: dict
    sentinels: np.ndarray

    @classmethod
    def from_tokenizer(cls, tok: Tokenizer) -> TokenIds:
        sentinels = np.array([tok.sentinel_id(k) for k in range(tok.num_sentinels)], dtype=np.int32)
        return cls(tok.pad_id, tok.eos_id, dict(tok.mode_ids), sentinels)


def row_examples(raw: np.ndarray, slots: int, mixture: Sequence[Denoiser], cum_weights: np.ndarray,
                 examples_per_row: int, ids: TokenIds, rng: np.random.Generator) -> list[tuple[np.ndarray, int, int]]:
    """Fill one row's ``slots`` with examples cut from consecutive raw tokens.

    Returns ``(sequence, prefix_len, denoiser_index)`` per example. The j-th of ``examples_per_row``
    examples gets an even share of the slots still free; when the sentinels run out before a row is
    full (long rows, dense X), further examples fill the rest.
    """
    out: list[tuple[np.ndarray, int, int]] = []
    start, free = 0, slots
    while True:
        j = len(out)
        choice = int(np.searchsorted(cum_weights, rng.random() * cum_weights[-1], side="right"))
        denoiser = mixture[choice]
        budget = free // max(1, examples_per_row - j)
        n = min(raw.size - start, max_raw_tokens(denoiser, budget, ids.sentinels.size))
        if n < MIN_EXAMPLE_TOKENS:
            return out
        inputs, targets = corrupt(raw[start: start + n], denoiser, rng, ids.sentinels)
        seq = np.concatenate([[ids.modes[denoiser.mode]], inputs, targets, [ids.eos]]).astype(np.int32)
        out.append((seq, 1 + inputs.size, choice))
        start += n
        free -= seq.size - 1


def pack_examples(examples_by_row: Sequence[Sequence[tuple[np.ndarray, int, int]]], slots: int, pad_id: int) -> Batch:
    """Write each row's examples side by side (segments 1..k), shifted by one, padding the tail."""
    rows = len(examples_by_row)
    batch = {k: np.zeros((rows, slots), np.int32) for k in
             ("inputs", "targets", "segment_ids", "positions", "loss_mask", "bidirectional")}
    if pad_id:
        batch["inputs"][:] = pad_id
        batch["targets"][:] = pad_id
    for r, examples in enumerate(examples_by_row):
        at = 0
        for seg, (seq, prefix, _) in enumerate(examples, start=1):
            m = seq.size - 1
            window = slice(at, at + m)
            batch["inputs"][r, window] = seq[:-1]
            batch["targets"][r, window] = seq[1:]
            batch["segment_ids"][r, window] = seg
            batch["positions"][r, window] = np.arange(m)
            batch["bidirectional"][r, at: at + prefix] = 1
            batch["loss_mask"][r, at + prefix - 1: at + m] = 1
            at += m
    return batch


def row_seed(tokens: np.ndarray) -> int:
    """A stateless per-row seed: the crc32 of the row's tokens (same row, same examples)."""
    return zlib.crc32(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())


# ----------------------------------------------------------------------------- objective


class MixtureOfDenoisers(ObjectiveBase):
    """UL2 MoD as a prefix-LM objective on the plain decoder (see the module docstring for the layout)."""

    name = "ul2"
    next_token_eval = False  # the loss covers only denoising targets; the trainer validates causally

    def __init__(self, cfg: ObjectiveConfig, tokenizer: Tokenizer | None = None):
        super().__init__(cfg, tokenizer)
        if cfg.examples_per_row < 1:
            raise ConfigError(f"objective.examples_per_row={cfg.examples_per_row} must be >= 1")
        self.mixture = mixture_from_config(cfg)
        self.cum_weights = np.cumsum([d.weight for d in self.mixture])
        # The trainer passes its tokenizer; without one (tests, tools) the byte tokenizer's ids apply.
        self.ids = TokenIds.from_tokenizer(tokenizer or ByteTokenizer())

    def check_fits(self, slots: int) -> None:
        """Every denoiser must fit an example of MIN_EXAMPLE_TOKENS raw tokens into one example's share."""
        share = slots // self.cfg.examples_per_row
        for d in self.mixture:
            if max_raw_tokens(d, share, self.ids.sentinels.size) < MIN_EXAMPLE_TOKENS:
                raise ConfigError(f"data.seq_len={slots} split into objective.examples_per_row="
                                  f"{self.cfg.examples_per_row} leaves {share} tokens per example, too few for "
                                  f"the {d.kind} denoiser (rate {d.rate}); raise data.seq_len or lower it")

    def examples(self, rows: Batch) -> list[list[tuple[np.ndarray, int, int]]]:
        """Per row: ``(sequence, prefix_len, denoiser_index)`` of each example (for tests and tools)."""
        tokens, seg = np.asarray(rows["tokens"]), np.asarray(rows["segment_ids"])
        slots = tokens.shape[-1] - 1
        self.check_fits(slots)
        out = []
        for row, row_seg in zip(tokens, seg, strict=True):
            raw = row[row_seg != 0]
            rng = np.random.default_rng(row_seed(raw))
            out.append(row_examples(raw, slots, self.mixture, self.cum_weights, self.cfg.examples_per_row,
                                    self.ids, rng))
        return out

    def prepare(self, rows: Batch) -> Batch:
        slots = np.asarray(rows["tokens"]).shape[-1] - 1
        return pack_examples(self.examples(rows), slots, self.ids.pad)

    def loss(self, model, batch: dict[str, jax.Array]) -> tuple[jax.Array, Metrics]:
        hidden = model(batch["inputs"], batch["positions"], batch["segment_ids"],
                       bidirectional=batch["bidirectional"].astype(bool))
        metrics = masked_cross_entropy(model.logits(hidden), batch["targets"], batch["loss_mask"])
        return metrics["loss"], metrics
