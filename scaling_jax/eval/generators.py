"""Task generators that write BIG-bench-format JSON, so emergence can be studied offline at any difficulty.

- ``navigate``: do these moves (always facing forward) return to the start? (BIG-bench ``navigate``)
- ``date_arith``: the date some days/weeks before or after a given date (BIG-bench ``date_understanding`` style)
- ``arithmetic``: multi-digit addition, subtraction or multiplication (BIG-bench ``arithmetic`` style)
- ``code_completion``: finish a function of the embedded corpus (the Python standard library); functions
  with doctests carry an execution check, run in a separate, isolated Python process with a timeout
  (model output is never executed in the evaluating process).

Every generator is seeded and takes its difficulty as keyword arguments; ``generate_task`` parses
``name:key=value,...`` so the CLI can ask for ``arithmetic:digits=4,op=*``.
"""

from __future__ import annotations

import ast
import datetime
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable

import numpy as np

from scaling_jax.errors import DataError
from scaling_jax.eval.tasks import Example

# ----------------------------------------------------------------------------- navigate

_DIRECTIONS = {"forward": (0, 1), "backward": (0, -1), "left": (-1, 0), "right": (1, 0)}


def _moves(rng: np.random.Generator, count: int, max_steps: int) -> list[tuple[str, int]]:
    names = list(_DIRECTIONS)
    return [(names[rng.integers(4)], int(rng.integers(1, max_steps + 1))) for _ in range(count)]


def _displacement(moves: list[tuple[str, int]]) -> tuple[int, int]:
    return (sum(_DIRECTIONS[d][0] * k for d, k in moves), sum(_DIRECTIONS[d][1] * k for d, k in moves))


def _returning_moves(rng: np.random.Generator, count: int, max_steps: int) -> list[tuple[str, int]]:
    """``count`` moves that end at the start: count-2 random ones, closed by one x and one y move (``navigate``
    admits only settings where such walks exist; the cap guards against a rare run of misses)."""
    for _ in range(100_000):
        moves = _moves(rng, count - 2, max_steps)
        dx, dy = _displacement(moves)
        if dx and dy and abs(dx) <= max_steps and abs(dy) <= max_steps:
            moves += [("left" if dx > 0 else "right", abs(dx)), ("backward" if dy > 0 else "forward", abs(dy))]
            return [moves[i] for i in rng.permutation(len(moves))]
    raise DataError(f"navigate: no returning walk of {count} moves of at most {max_steps} steps found; use more "
                    "moves or a larger max_steps")


def navigate(n: int = 100, seed: int = 0, moves: int = 5, max_steps: int = 5) -> dict:
    """Half the examples return to the start; difficulty: number of moves and their largest step."""
    # a returning walk closes with one x and one y move, so the random part (moves - 2) must be able to leave both
    # axes off zero: at least 2 moves, and with unit steps an even count (|dx| + |dy| = 2 has its parity)
    if moves < 4 or max_steps < 1 or (max_steps == 1 and moves % 2):
        raise DataError(f"navigate: need moves >= 4 (even when max_steps=1) and max_steps >= 1, got moves={moves}, "
                        f"max_steps={max_steps}")
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(n):
        back = i % 2 == 0
        if back:
            seq = _returning_moves(rng, moves, max_steps)
        else:
            seq = _moves(rng, moves, max_steps)
            while _displacement(seq) == (0, 0):
                seq = _moves(rng, moves, max_steps)
        text = " ".join(f"Take {k} step{'s' if k > 1 else ''} {d}." for d, k in seq)
        answer = "True" if back else "False"
        examples.append({"input": "If you follow these instructions, do you return to the starting point? "
                                  f"Always face forward. {text}",
                         "target": answer, "target_scores": {"True": float(back), "False": float(not back)}})
    return {"name": "navigate", "description": f"navigate, {moves} moves of up to {max_steps} steps",
            "keywords": ["logical reasoning", "generated"], "metrics": ["exact_str_match", "multiple_choice_grade"],
            "preferred_score": "exact_str_match", "examples": examples}


# ----------------------------------------------------------------------------- dates

DATE_FORMAT = "%m/%d/%Y"


def date_arith(n: int = 100, seed: int = 0, max_days: int = 30, unit: str = "days", choices: int = 4) -> dict:
    """"Today is 03/05/2019. What is the date 17 days later?" -> "03/22/2019"; distractors shift by a day,
    a month or a year. Difficulty: the largest offset and its unit (days or weeks)."""
    if unit not in ("days", "weeks") or max_days < 1:
        raise DataError(f"date_arith: unit must be days or weeks and max_days >= 1, got {unit!r}, {max_days}")
    rng = np.random.default_rng(seed)
    start = datetime.date(1990, 1, 1)
    examples = []
    for _ in range(n):
        today = start + datetime.timedelta(days=int(rng.integers(0, 365 * 40)))
        k = int(rng.integers(1, max_days + 1))
        later = bool(rng.integers(2))
        delta = datetime.timedelta(days=k * (7 if unit == "weeks" else 1))
        answer = today + delta if later else today - delta
        wrong = {answer + datetime.timedelta(days=d) for d in (-1, 1)}
        wrong |= {answer.replace(year=answer.year + d) for d in (-1, 1) if not (answer.month == 2 and answer.day == 29)}
        wrong |= {today - delta if later else today + delta}
        wrong.discard(answer)
        # distractors drawn at random: the earliest ones would make "pick the latest date" right on every
        # "later" question
        wrong_dates = sorted(wrong)
        options = [answer] + [wrong_dates[i] for i in rng.permutation(len(wrong_dates))[: choices - 1]]
        word = unit if k > 1 else unit[:-1]
        examples.append({
            "input": f"Today is {today.strftime(DATE_FORMAT)}. What is the date {k} {word} "
                     f"{'later' if later else 'ago'} in MM/DD/YYYY?",
            "target": answer.strftime(DATE_FORMAT),
            "target_scores": {d.strftime(DATE_FORMAT): float(d == answer) for d in options}})
    return {"name": "date_arith", "description": f"date arithmetic, up to {max_days} {unit}",
            "keywords": ["date understanding", "arithmetic", "generated"],
            "metrics": ["exact_str_match", "multiple_choice_grade"], "preferred_score": "exact_str_match",
            "examples": examples}


# ----------------------------------------------------------------------------- arithmetic

_OPS: dict[str, tuple[str, Callable[[int, int], int]]] = {
    "+": ("plus", lambda a, b: a + b), "-": ("minus", lambda a, b: a - b), "*": ("times", lambda a, b: a * b)}


def _carries(a: int, b: int) -> int:
    """Column carries in the written addition a + b."""
    count = carry = 0
    while a or b:
        carry = int(a % 10 + b % 10 + carry >= 10)
        count += carry
        a, b = a // 10, b // 10
    return count


def arithmetic(n: int = 100, seed: int = 0, digits: int = 2, op: str = "+", choices: int = 4,
               carries: int | None = None) -> dict:
    """"What is 347 plus 589?" -> "936"; difficulty: operand digits and the operation, and for addition
    ``carries=k`` (only problems whose written sum has exactly k column carries, 0..digits). ``choices=0``
    drops the multiple-choice options (they are appended to the prompt, which would give the answer away)."""
    if op not in _OPS or digits < 1 or choices < 0:
        raise DataError(f"arithmetic: op must be one of {', '.join(_OPS)}, digits >= 1 and choices >= 0, "
                        f"got {op!r}, {digits}, {choices}")
    if carries is not None and (op != "+" or not 0 <= carries <= digits):
        raise DataError(f"arithmetic: carries=k needs op=+ and 0 <= k <= digits, got op={op!r}, carries={carries}")
    word, fn = _OPS[op]
    rng = np.random.default_rng(seed)
    low, high = 10 ** (digits - 1) if digits > 1 else 0, 10 ** digits
    examples = []
    for _ in range(n):
        a, b = int(rng.integers(low, high)), int(rng.integers(low, high))
        while carries is not None and _carries(a, b) != carries:  # rejection: the default draws are unchanged
            a, b = int(rng.integers(low, high)), int(rng.integers(low, high))
        answer = fn(a, b)
        wrong = {answer + d for d in (-10, -1, 1, 10, 100)} - {answer}
        options = [answer] + sorted(wrong, key=lambda w: (abs(w - answer), w))[: choices - 1]
        example = {"input": f"What is {a} {word} {b}?", "target": str(answer)}
        if choices:  # shown after the question (BIG-bench style), so only a generative task has choices=0
            example["target_scores"] = {str(o): float(o == answer) for o in options}
        examples.append(example)
    level = "" if carries is None else f", {carries} carr{'y' if carries == 1 else 'ies'}"
    return {"name": "arithmetic", "description": f"{digits}-digit {word}{level}",
            "keywords": ["arithmetic", "generated"],
            "metrics": ["exact_str_match", "multiple_choice_grade"], "preferred_score": "exact_str_match",
            "examples": examples}


# ----------------------------------------------------------------------------- code completion

_CHECK_SCRIPT = r"""
import doctest, importlib, json, sys
spec = json.loads(sys.stdin.read())
namespace = dict(vars(importlib.import_module(spec["module"])))
exec(compile(spec["source"], "<candidate>", "exec"), namespace)
fn = namespace[spec["function"]]
test = doctest.DocTestParser().get_doctest(fn.__doc__ or "", namespace, spec["function"], None, 0)
result = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS).run(test, out=lambda s: None)
sys.exit(0 if result.attempted and not result.failed else 1)
"""


def run_candidate(source: str, module: str, function: str, timeout: float = 5.0) -> bool:
    """Run ``function``'s doctests against candidate ``source`` executed in ``module``'s namespace, in a fresh
    isolated interpreter (``python -I``, temporary working directory) killed after ``timeout`` seconds."""
    spec = json.dumps({"source": source, "module": module, "function": function})
    with tempfile.TemporaryDirectory() as cwd:
        try:
            proc = subprocess.run([sys.executable, "-I", "-c", _CHECK_SCRIPT], input=spec, text=True, cwd=cwd,
                                  capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
    return proc.returncode == 0


def run_execution_check(example: Example, response: str, timeout: float = 5.0) -> bool:
    """Does the prompt's function, completed by ``response``, pass its doctests?"""
    spec = example.extra["execution"]
    return run_candidate(spec["prefix"] + response, spec["module"], spec["function"], timeout)


def _module_name(relative: str) -> str:
    parts = relative[:-3].split("/")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def corpus_functions(split: str = "validation", max_lines: int = 12, val_fraction: float = 0.05):
    """``(module, name, source, has_doctest)`` of top-level functions of the stdlib corpus, sorted.
    ``split='validation'`` keeps only documents the trainer holds out (same hash split as training)."""
    from scaling_jax.data import sources

    root = sources._stdlib_dir()
    out = []
    for path in sources.stdlib_files():
        rel = path.relative_to(root).as_posix()
        if split != "all" and sources.is_validation(rel, val_fraction) != (split == "validation"):
            continue
        if "/test" in f"/{rel}" or "idlelib" in rel:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
        except (SyntaxError, ValueError):
            continue
        lines = text.splitlines()
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and not node.decorator_list:
                body = lines[node.lineno - 1:node.end_lineno]
                if len(body) <= max_lines:
                    doc = ast.get_docstring(node) or ""
                    out.append((_module_name(rel), node.name, "\n".join(body), ">>>" in doc))
    return out


def code_completion(n: int = 100, seed: int = 0, lines: int = 1, max_lines: int = 12, split: str = "validation",
                    execution_only: bool = False, max_target_chars: int = 0, timeout: float = 5.0) -> dict:
    """Complete the last ``lines`` lines of a short stdlib function (difficulty: lines to write, function length).

    The prompt is the function up to those lines; the target is the missing text (at most ``max_target_chars``
    characters when set). Functions with doctests
    that pass in their module get an ``execution`` check (used by the ``code_execution`` metric)."""
    if lines < 1 or max_lines <= lines + 1:
        raise DataError(f"code_completion: need lines >= 1 and max_lines > lines + 1, got {lines}, {max_lines}")
    rng = np.random.default_rng(seed)
    candidates = []
    for module, name, source, has_doctest in corpus_functions(split, max_lines):
        src_lines = source.split("\n")
        prefix, target = "\n".join(src_lines[:-lines]) + "\n", "\n".join(src_lines[-lines:])
        if len(src_lines) < lines + 2 or not target.strip() or target.strip().startswith("#"):
            continue
        if max_target_chars and len(target) > max_target_chars:
            continue
        if execution_only and not has_doctest:
            continue
        candidates.append((module, name, prefix, target, has_doctest))
    order = rng.permutation(len(candidates))
    examples = []
    for idx in order:
        if len(examples) == n:
            break
        module, name, prefix, target, has_doctest = candidates[idx]
        example = {"input": prefix, "target": target, "source": f"{module}.{name}"}
        if has_doctest and run_candidate(prefix + target, module, name, timeout):
            example["execution"] = {"module": module, "function": name, "prefix": prefix}
        elif execution_only:
            continue
        examples.append(example)
    if not examples:
        raise DataError(f"code_completion: no {split} functions of at most {max_lines} lines fit; "
                        "raise max_lines or use split=all")
    return {"name": "code_completion", "description": f"complete the last {lines} line(s) of stdlib functions",
            "keywords": ["code", "generated"], "metrics": ["code_execution", "exact_str_match"],
            "preferred_score": "code_execution", "task_prefix": "", "example_input_prefix": "",
            "example_output_prefix": "", "few_shot_example_separator": "\n\n",
            "stop_string": "\n" if lines == 1 else "\n\n", "examples": examples}


# ----------------------------------------------------------------------------- registry

GENERATORS: dict[str, Callable[..., dict]] = {"navigate": navigate, "date_arith": date_arith,
                                               "arithmetic": arithmetic, "code_completion": code_completion}


def parse_spec(spec: str) -> tuple[str, dict]:
    """``'arithmetic:digits=3,op=*'`` -> ``('arithmetic', {'digits': 3, 'op': '*'})`` (values parsed as YAML)."""
    import yaml

    name, _, args = spec.partition(":")
    kwargs = {}
    for item in filter(None, args.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise DataError(f"task '{spec}': write difficulty settings as key=value, e.g. arithmetic:digits=3")
        try:
            kwargs[key.strip()] = yaml.safe_load(value) if value not in ("+", "-", "*") else value
        except yaml.YAMLError:  # (e.g. op=%): the generator's own check names the bad value
            kwargs[key.strip()] = value
    return name, kwargs


def split_task_specs(text: str) -> list[str]:
    """``--tasks`` as a list: a comma followed by ``key=`` continues a generator's settings
    (``arithmetic:digits=3,op=*,navigate`` is two tasks); any other comma starts the next task."""
    return [t for t in re.split(r",(?![A-Za-z_]\w*=)", text) if t]


def generate_task(spec: str, n: int = 100, seed: int = 0) -> dict:
    """A generated task as BIG-bench JSON from ``name[:key=value,...]``."""
    name, kwargs = parse_spec(spec)
    if name not in GENERATORS:
        raise DataError(f"task '{name}' is neither a file nor a generator; generators: {', '.join(GENERATORS)}")
    defaults = inspect.signature(GENERATORS[name]).parameters
    for key, value in kwargs.items():  # a setting of the wrong kind failed deep inside as a comparison error
        default = defaults[key].default if key in defaults else None
        want = type(default)  # bool and other defaults are left to the generator
        fits = isinstance(value, want) or (want is float and isinstance(value, int))
        if want in (int, float, str) and (isinstance(value, bool) or not fits):
            raise DataError(f"task '{spec}': {key}={value!r} must be {want.__name__} (default {default!r}); see "
                            "scaling_jax/eval/generators.py for its difficulty settings")
    try:
        return GENERATORS[name](n=n, seed=seed, **kwargs)
    except TypeError as e:
        raise DataError(f"task '{spec}': {e}; see scaling_jax/eval/generators.py for its difficulty settings") \
            from None


def write_task(task: dict, path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(task, f, indent=1)
    return path
