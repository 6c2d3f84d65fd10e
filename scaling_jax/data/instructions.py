"""Instruction mixtures for Flan-style finetuning: ``{inputs, targets}`` examples, templates, packing.

``data.instructions`` lists the datasets of a mixture, each ``{source, rate, template, shots}``:

* ``source``: a JSONL file of ``{"inputs": ..., "targets": ...}`` objects (an optional
  ``"rationale"`` feeds the chain-of-thought template), or ``generated:TASK`` for one of the
  offline tasks below (``GENERATED``), so a mixture runs with nothing downloaded;
* ``rate``: mixing weight; the training stream draws each next example's dataset with
  probability proportional to it (a dataset drawn more often than it has examples repeats);
* ``template``: ``zero_shot`` (the instruction as is), ``few_shot`` (``shots`` solved train
  examples of the same dataset first), ``cot`` (asks for step-by-step reasoning; the target is
  the rationale then ``So the answer is ...``).

Examples are split train/validation by a hash of their inputs (identical prompts never straddle
the split), formatted as ``[bos] prompt target [eos]`` and packed whole, several per row, into
rows of ``data.seq_len + 1`` tokens with segment ids and a ``target_mask`` (1 on target tokens
and the eos). Objectives turn those rows into batches: ``finetune`` trains on the targets only,
with the prompt attended bidirectionally.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from scaling_jax.config import Config
from scaling_jax.data.sources import is_validation, stdlib_files, unigram_bits_per_byte, utf8_line
from scaling_jax.data.tokenizer import Tokenizer
from scaling_jax.errors import ConfigError, DataError

TEMPLATES = ("zero_shot", "few_shot", "cot")
GENERATED_EXAMPLES = 4000  # examples per generated task (before the train/validation split)


@dataclass(frozen=True)
class Example:
    inputs: str
    targets: str
    rationale: str = ""  # step-by-step reasoning, for the cot template


@dataclass(frozen=True)
class MixtureEntry:
    source: str
    rate: float = 1.0
    template: str = "zero_shot"
    shots: int = 3


# ----------------------------------------------------------------------------- config


def mixture_from_config(raw: list) -> list[MixtureEntry]:
    """``data.instructions`` -> entries; errors name ``data.instructions[i].field``."""
    entries = []
    for i, item in enumerate(raw):
        where = f"data.instructions[{i}]"
        if isinstance(item, str):
            item = {"source": item}
        if not isinstance(item, dict) or "source" not in item:
            raise ConfigError(f"{where} must be a mapping like {{source: data/qa.jsonl, rate: 1.0}}, got {item!r}")
        unknown = sorted(set(item) - {"source", "rate", "template", "shots"})
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]} is not a mixture field; use source, rate, template, shots")
        entry = MixtureEntry(str(item["source"]), item.get("rate", 1.0), item.get("template", "zero_shot"),
                             item.get("shots", 3))
        if isinstance(entry.rate, bool) or not isinstance(entry.rate, (int, float)) or entry.rate <= 0:
            raise ConfigError(f"{where}.rate={entry.rate!r} must be a number > 0")
        if entry.template not in TEMPLATES:
            raise ConfigError(f"{where}.template={entry.template!r} is not one of {', '.join(TEMPLATES)}")
        if isinstance(entry.shots, bool) or not isinstance(entry.shots, int) or entry.shots < 1:
            raise ConfigError(f"{where}.shots={entry.shots!r} must be an integer >= 1")
        task = entry.source.removeprefix("generated:")
        if entry.source.startswith("generated:") and task not in GENERATED:
            raise ConfigError(f"{where}.source: unknown generated task '{task}'; choose one of {', '.join(GENERATED)}")
        entries.append(entry)
    return entries


# ----------------------------------------------------------------------------- reading


def read_jsonl(path: str) -> list[Example]:
    """``{"inputs", "targets"[, "rationale"]}`` per non-blank line; errors name ``file:line``."""
    if not os.path.isfile(path):
        raise DataError(f"instruction file '{path}' does not exist; fix data.instructions[].source")
    out, offset = [], 0
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            line, offset = utf8_line(raw, path, lineno, offset, escape=""), offset + len(raw)
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno} is not valid JSON ({e.msg}); write one object per line") from None
            fields = ("inputs", "targets")
            if not isinstance(obj, dict) or not all(isinstance(obj.get(k), str) for k in fields):
                raise DataError(f"{path}:{lineno} must be an object with string fields 'inputs' and 'targets'")
            rationale = obj.get("rationale")
            if rationale is not None and not isinstance(rationale, str):
                raise DataError(f"{path}:{lineno} field 'rationale' must be a string (or absent)")
            out.append(Example(obj["inputs"], obj["targets"], rationale or ""))
    if not out:
        raise DataError(f"instruction file '{path}' holds no examples")
    return out


def write_jsonl(examples: Sequence[Example], path: str) -> None:
    """The format ``read_jsonl`` reads (``rationale`` only when there is one)."""
    with open(path, "w", encoding="utf-8") as f:
        for x in examples:
            row = {"inputs": x.inputs, "targets": x.targets, **({"rationale": x.rationale} if x.rationale else {})}
            f.write(json.dumps(row) + "\n")


# ----------------------------------------------------------------------------- generated tasks


def arithmetic(rng: np.random.Generator) -> Example:
    """Add two numbers; the rationale adds column by column with carries."""
    a, b = (int(v) for v in rng.integers(0, 1000, size=2))
    steps, carry = [], 0
    da, db = str(a)[::-1], str(b)[::-1]
    for i in range(max(len(da), len(db))):
        x, y = int(da[i]) if i < len(da) else 0, int(db[i]) if i < len(db) else 0
        total = x + y + carry
        steps.append(f"{x} + {y}" + (f" + {carry}" if carry else "") + f" = {total}")
        carry = total // 10
    if carry:
        steps.append(f"carry {carry}")
    return Example(f"What is {a} + {b}?", str(a + b), ", ".join(steps) + ".")


WORDS = ("apple", "river", "stone", "cloud", "table", "green", "light", "music", "paper", "tiger", "house",
         "water", "bread", "chair", "dream", "earth", "flame", "glass", "heart", "juice")


def reverse_words(rng: np.random.Generator) -> Example:
    """Reverse the order of a few words; the rationale lists them from the end."""
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), size=int(rng.integers(2, 6)))]
    steps = [f"word {len(words) - i} is {w}" for i, w in enumerate(reversed(words))]
    return Example(f"Reverse the order of the words: {' '.join(words)}", " ".join(reversed(words)),
                   ", ".join(steps) + ".")


_DEF = re.compile(r"^\s*def (\w+)\(([^)]*)\)")


@functools.lru_cache(maxsize=1)
def _stdlib_functions() -> tuple[tuple[str, str], ...]:
    """(name, argument list) of stdlib function definitions, in corpus order (read once)."""
    found = []
    for path in stdlib_files():
        for line in path.read_text("utf-8", errors="replace").splitlines():
            m = _DEF.match(line)
            if m and 0 < len(m.group(2)) <= 60:
                found.append((m.group(1), m.group(2)))
    return tuple(found)


def function_arguments(rng: np.random.Generator) -> Example:
    """From the embedded corpus: the argument list of a named standard-library function."""
    functions = _stdlib_functions()
    name, args = functions[int(rng.integers(len(functions)))]
    return Example(f"In the Python standard library, complete the signature: def {name}(", f"{args})",
                   f"The function is named {name}.")


GENERATED: dict[str, Callable[[np.random.Generator], Example]] = {
    "arithmetic": arithmetic, "reverse_words": reverse_words, "function_arguments": function_arguments}


def generate(task: str, n: int = GENERATED_EXAMPLES, seed: int = 0) -> list[Example]:
    """``n`` examples of a generated task, a pure function of (task, n, seed)."""
    rng = np.random.default_rng([seed, sorted(GENERATED).index(task)])
    return [GENERATED[task](rng) for _ in range(n)]


def load_examples(entry: MixtureEntry) -> list[Example]:
    if entry.source.startswith("generated:"):
        return generate(entry.source.removeprefix("generated:"))
    return read_jsonl(os.path.expanduser(entry.source))


def split(examples: Sequence[Example], val_fraction: float) -> tuple[list[Example], list[Example]]:
    """Train / validation by a stable hash of the inputs (duplicates of a prompt stay together)."""
    train, val = [], []
    for x in examples:
        (val if is_validation(x.inputs, val_fraction) else train).append(x)
    return train, val


# ----------------------------------------------------------------------------- templates


def render(x: Example, entry: MixtureEntry, exemplars: Sequence[Example]) -> tuple[str, str]:
    """(prompt, target) text of one example under the entry's template."""
    if entry.template == "cot":
        if not x.rationale:
            raise DataError(f"template cot needs a 'rationale' for every example of {entry.source}; "
                            "add it to the JSONL or use template zero_shot")
        return f"{x.inputs}\nLet's think step by step.\n", f"{x.rationale} So the answer is {x.targets}."
    shots = "".join(f"{e.inputs}\n{e.targets}\n\n" for e in exemplars) if entry.template == "few_shot" else ""
    return f"{shots}{x.inputs}\n", x.targets


def exemplars_for(i: int, pool: Sequence[Example], x: Example, shots: int, seed: int) -> list[Example]:
    """``shots`` train examples other than ``x``, chosen by a generator seeded with the example's index."""
    rng = np.random.default_rng([seed, i])
    picks = [pool[j] for j in rng.choice(len(pool), size=min(len(pool), shots + 1), replace=False)]
    return [e for e in picks if e != x][:shots]


def encode(prompt: str, target: str, tokenizer: Tokenizer, length: int) -> tuple[np.ndarray, int]:
    """``[bos] prompt target [eos]`` cut to ``length`` tokens, and how many of them are prompt.

    Long prompts lose the beginning of their text, after bos (few-shot exemplars go first, the question
    stays; every example still starts as a document does); targets are cut at the end only if they alone
    overflow.
    """
    text = np.asarray(tokenizer.encode(prompt), np.int64)
    t = np.concatenate([tokenizer.encode(target), [tokenizer.eos_id]])[: length - 1]
    room = length - 1 - t.size  # for the prompt's text, after bos
    p = np.concatenate([[tokenizer.bos_id], text[max(0, text.size - room):]])
    return np.concatenate([p, t]).astype(np.int32), int(p.size)


# ----------------------------------------------------------------------------- packing


class PackedExamples:
    """Rows of whole examples (greedy, in order): ``tokens``, ``segment_ids``, ``target_mask``, each ``[length]``."""

    def __init__(self, examples: Sequence[tuple[np.ndarray, int]], length: int, pad_id: int):
        rows: list[list[tuple[np.ndarray, int]]] = [[]]
        used = 0
        for seq, prompt in examples:
            if used + seq.size > length:
                rows.append([])
                used = 0
            rows[-1].append((seq, prompt))
            used += seq.size
        rows = [r for r in rows if r]
        self.tokens = np.full((len(rows), length), pad_id, np.int32)
        self.segment_ids = np.zeros((len(rows), length), np.int32)
        self.target_mask = np.zeros((len(rows), length), np.int32)
        for r, row in enumerate(rows):
            at = 0
            for seg, (seq, prompt) in enumerate(row, start=1):
                self.tokens[r, at: at + seq.size] = seq
                self.segment_ids[r, at: at + seq.size] = seg
                self.target_mask[r, at + prompt: at + seq.size] = 1
                at += seq.size
        self.num_examples = len(examples)

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[i], "segment_ids": self.segment_ids[i], "target_mask": self.target_mask[i]}


def mixed_order(sizes: Sequence[int], rates: Sequence[float], seed: int) -> list[tuple[int, int]]:
    """(dataset, example index) for a stream as long as all datasets together, datasets drawn by rate.

    Each dataset is walked in its own shuffled order and restarts (reshuffled) when exhausted.
    """
    rng = np.random.default_rng(seed)
    p = np.asarray(rates, float) / float(np.sum(rates))
    draws = rng.choice(len(sizes), size=int(np.sum(sizes)), p=p)
    orders = [rng.permutation(n) for n in sizes]
    taken = [0] * len(sizes)
    out = []
    for d in draws:
        if taken[d] and taken[d] % sizes[d] == 0:
            orders[d] = rng.permutation(sizes[d])
        out.append((int(d), int(orders[d][taken[d] % sizes[d]])))
        taken[d] += 1
    return out


class InstructionData:
    """Train and validation rows of an instruction mixture (the loop's data bundle for ``data.instructions``)."""

    def __init__(self, config: Config, tokenizer: Tokenizer):
        d = config.data
        entries = mixture_from_config(d.instructions)
        length = d.seq_len + 1
        parts = [split(load_examples(e), d.val_fraction) for e in entries]
        for e, (train, val) in zip(entries, parts, strict=True):
            if not train or not val:
                raise DataError(f"instruction source {e.source} gives {len(train)} train / {len(val)} validation "
                                "examples; add examples or change data.val_fraction")

        def formatted(k: int, i: int, x: Example) -> tuple[str, str]:
            entry, pool = entries[k], parts[k][0]
            exemplars = exemplars_for(i, pool, x, entry.shots, d.shuffle_seed) if entry.template == "few_shot" else []
            return render(x, entry, exemplars)

        order = mixed_order([len(p[0]) for p in parts], [e.rate for e in entries], d.shuffle_seed)
        train_text = [formatted(k, i, parts[k][0][i]) for k, i in order]
        val_text = [formatted(k, i, x) for k, (_, val) in enumerate(parts) for i, x in enumerate(val)]
        self.baseline_bpb = unigram_bits_per_byte((t for _, t in train_text), (t for _, t in val_text))
        self.train_rows = PackedExamples([encode(p, t, tokenizer, length) for p, t in train_text], length,
                                         tokenizer.pad_id)
        self.val_rows = PackedExamples([encode(p, t, tokenizer, length) for p, t in val_text], length,
                                       tokenizer.pad_id)
        self.num_train_docs, self.num_val_docs = len(train_text), len(val_text)
