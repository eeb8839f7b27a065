"""Reward sources for the online stages (ppo, grpo): where a completion's reward comes from.

A source is a function `(prompts, completions, **columns) -> list[float | None]`, one value per completion;
`columns` are the other dataset columns of the prompts' rows (e.g. `answer`, `tests`). `rewards:` in the
config is a list of specs, combined as a weighted sum:

    {function: "module:fn" | "path/to/file.py:fn", weight: 1.0}   a Python callable
    {model: DIR, weight: 1.0}                                      a reward model (stage rm output)
    {builtin: NAME, weight: 1.0, ...options}                       one of BUILTINS below
    {http: URL, weight: 1.0, timeout: 30}                          POST {prompts, completions, columns},
                                                                   answer {"rewards": [...]}
Any spec may also carry `name:` (used in errors and in the `reward/<name>` metrics).

A value of None means "no reward for this completion": an error, unless skip_invalid (then it counts as 0
and is counted in the metrics). A function that raises, returns the wrong length, a non-number or NaN/inf
stops with an error naming the source and the prompt index.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import math
import numbers
import os
import re
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, DataError, PosttrainError

RewardFn = Callable[..., "list[float | None]"]


@dataclass
class RewardSource:
    name: str
    fn: RewardFn
    weight: float = 1.0


# --------------------------------------------------------------------------- built-ins
# Each takes (prompts, completions, columns, **options); options come from the spec.

def _column(columns: dict, name: str, builtin: str) -> list:
    if name not in columns:
        raise ConfigError(f"reward builtin '{builtin}' needs the dataset column '{name}' "
                          f"(columns: {sorted(columns) or 'none'})")
    return columns[name]


def _normalize(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive form: 'The  Answer: 42.' -> 'the answer 42'."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


_ANSWER_PREFIX = re.compile(r"^\s*(the\s+)?(final\s+)?answer\s*(is|:)\s*", re.IGNORECASE)
_ANSWER_EDGE = " \t.,!?;:'\"`*"


def normalize_answer(text: str) -> str:
    """First non-empty line, without an "Answer:" / "The answer is" prefix, edge punctuation, commas
    between items or repeated spaces. Case is kept: it is part of the value."""
    lines = [line for line in str(text).splitlines() if line.strip()]
    s = _ANSWER_PREFIX.sub("", lines[0] if lines else "").strip(_ANSWER_EDGE)
    return " ".join(s.replace(",", " ").split())


def exact_answer(answer: str, completion: str) -> float:
    """1.0 when the completion's answer (normalize_answer) equals the reference answer, else 0.0: the default
    checker of `posttrain eval --tasks`."""
    return float(normalize_answer(completion) == normalize_answer(answer) != "")


def answer_match(prompts, completions, columns, *, column: str = "answer", normalize: bool = False):
    """1.0 when the completion equals the row's `column` (after _normalize if `normalize`), else 0.0."""
    answers = _column(columns, column, "answer_match")
    prep = _normalize if normalize else str.strip
    return [float(prep(c) == prep(str(a))) for c, a in zip(completions, answers)]


def regex(prompts, completions, columns, *, pattern: str):
    """1.0 when `pattern` matches anywhere in the completion (re.search), else 0.0."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        raise ConfigError(f"reward builtin 'regex': invalid pattern {pattern!r}: {exc}") from None
    return [float(compiled.search(c) is not None) for c in completions]


def length(prompts, completions, columns, *, target: int, unit: str = "chars"):
    """max(0, 1 - |len - target| / target), len in characters (`unit: chars`) or whitespace-separated
    words (`unit: words`): 1.0 at the target, 0.0 at zero length or twice the target and beyond."""
    if unit not in ("chars", "words") or not target or target <= 0:
        raise ConfigError(f"reward builtin 'length': need target > 0 and unit chars|words, got {target}, {unit}")
    sizes = [len(c) if unit == "chars" else len(c.split()) for c in completions]
    return [max(0.0, 1.0 - abs(n - target) / target) for n in sizes]


def json_valid(prompts, completions, columns):
    """1.0 when the whole completion (surrounding whitespace ignored) parses as JSON, else 0.0."""
    def ok(text):
        try:
            json.loads(text)
            return 1.0
        except ValueError:
            return 0.0
    return [ok(c) for c in completions]


# Runs before the program: sockets cannot be created (network access fails with OSError), then the
# program (completion + tests) runs as __main__ from a file, so tracebacks show its own line numbers.
_PRELUDE = """\
import socket
def _no_network(*args, **kwargs):
    raise OSError("network access is disabled in python_tests")
socket.socket = socket.create_connection = socket.socketpair = socket.fromfd = _no_network
del socket, _no_network
import runpy
runpy.run_path("program.py", run_name="__main__")
"""

_FENCE = re.compile(r"```(?:python|py|python3)?[ \t]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
    """The code in ```python fenced blocks (all of them, joined), or the whole completion if none."""
    blocks = _FENCE.findall(completion)
    return "\n\n".join(blocks) if blocks else completion


def _run_program(code: str, timeout: float) -> float:
    env = {"PATH": os.environ.get("PATH", ""), "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
    with tempfile.TemporaryDirectory(prefix="posttrain-tests-") as tmp:
        Path(tmp, "program.py").write_text(code, encoding="utf-8")
        env["HOME"] = env["TMPDIR"] = tmp
        process = subprocess.Popen([sys.executable, "-I", "-c", _PRELUDE], cwd=tmp, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            return float(process.wait(timeout=timeout) == 0)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)  # the whole session: children the program started too
            process.wait()
            return 0.0


def python_tests(prompts, completions, columns, *, column: str = "tests", timeout: float = 5.0,
                 workers: int = 4):
    """1.0 when the completion's code followed by the row's test code exits with status 0, else 0.0 (a
    failing assert, an exception, or running past `timeout` seconds). Each runs in a fresh subprocess
    (`python -I`, minimal environment without proxies, sockets disabled) in a new temporary directory.
    Not a security sandbox: the code can still read and write files the user can."""
    tests = _column(columns, column, "python_tests")
    programs = [f"{extract_code(c)}\n\n{t or ''}\n" for c, t in zip(completions, tests)]
    with ThreadPoolExecutor(max(1, workers)) as pool:
        return list(pool.map(lambda code: _run_program(code, timeout), programs))


BUILTINS: dict[str, Callable] = {"answer_match": answer_match, "regex": regex, "length": length,
                                 "json_valid": json_valid, "python_tests": python_tests}


# --------------------------------------------------------------------------- other sources

def load_callable(spec: str) -> RewardFn:
    """`module:function` (imported) or `path/to/file.py:function` (loaded from the file)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"reward function {spec!r}: expected 'module:function' or 'path/to/file.py:function'")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"reward function {spec!r}: file not found: {path}")
        module_spec = importlib.util.spec_from_file_location(f"posttrain_reward_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - user code; report it as a config problem
            raise ConfigError(f"reward function {spec!r}: loading {path} failed: {exc!r}") from None
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as exc:
            raise ConfigError(f"reward function {spec!r}: cannot import module {target!r}: {exc}") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"reward function {spec!r}: {target} has no function {name!r}")
    return fn


def model_source(path: str, max_length: int = 1024, batch_size: int = 16, device=None, dtype=None) -> RewardFn:
    """A reward model directory: the prompt as a user message, the completion as the assistant's answer,
    tokenized as stage rm tokenized its training data; the model's reward_offset is added. It is loaded on
    `device` in `dtype` (score.load_reward_model: a GPU when there is one, its compute dtype)."""
    from ..data.examples import Feedback
    from ..data.pairs import encode_feedback
    from ..score import load_reward_model, score_sequences

    model, tokenizer, offset = load_reward_model(path, device, dtype)

    def reward_model(prompts, completions, **columns):
        sequences = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            example = Feedback([{"role": "user", "content": prompt}],
                               [{"role": "assistant", "content": completion}], True, f"prompt {i}")
            f = encode_feedback(tokenizer, example, max_length)
            sequences.append(f["prompt_ids"] + f["completion_ids"])
        return score_sequences(model, sequences, tokenizer.pad_token_id, offset, batch_size)
    reward_model.model = model  # where it lives and in which dtype, for a look from outside
    return reward_model


def http_source(url: str, timeout: float = 30.0) -> RewardFn:
    """POSTs {"prompts", "completions", "columns"} as JSON to `url`; expects {"rewards": [...]}."""
    def http(prompts, completions, **columns):
        body = json.dumps({"prompts": prompts, "completions": completions, "columns": columns},
                          default=str).encode()
        request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                answer = json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise DataError(f"HTTP {exc.code} {exc.reason}", f"reward endpoint {url}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"reward endpoint {url}: cannot reach it: {getattr(exc, 'reason', exc)}") from None
        except ValueError:
            raise DataError("the answer is not JSON", f"reward endpoint {url}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            raise DataError('expected a JSON object {"rewards": [...]}', f"reward endpoint {url}")
        return answer["rewards"]
    return http


def _builtin(spec: dict) -> RewardFn:
    name = spec["builtin"]
    if name not in BUILTINS:
        raise ConfigError(f"unknown reward builtin {name!r}; choose from {', '.join(BUILTINS)}")
    fn = BUILTINS[name]
    options = {k: v for k, v in spec.items() if k not in ("builtin", "weight", "name")}
    allowed = [p.name for p in inspect.signature(fn).parameters.values() if p.kind is p.KEYWORD_ONLY]
    required = [p.name for p in inspect.signature(fn).parameters.values()
                if p.kind is p.KEYWORD_ONLY and p.default is p.empty]
    unknown, missing = set(options) - set(allowed), set(required) - set(options)
    if unknown or missing:
        raise ConfigError(f"reward builtin {name!r}: options are {allowed or 'none'}"
                          + (f"; unknown: {sorted(unknown)}" if unknown else "")
                          + (f"; missing: {sorted(missing)}" if missing else ""))
    # options are bound apart from the dataset columns, so a column named like an option cannot replace it
    return lambda prompts, completions, **columns: fn(prompts, completions, columns, **options)


_KINDS = ("function", "model", "builtin", "http")


def build_sources(specs: list[dict], device=None, dtype=None) -> list[RewardSource]:
    """The `rewards:` config list -> sources; names are unique (a repeated one gets '_2', '_3', ...). Reward
    models go to `device` in `dtype`."""
    if not specs:
        raise ConfigError("rewards: give at least one reward source")
    sources: list[RewardSource] = []
    for i, spec in enumerate(specs):
        kinds = [k for k in _KINDS if k in (spec if isinstance(spec, dict) else {})]
        if len(kinds) != 1:
            raise ConfigError(f"rewards[{i}]: expected exactly one of {', '.join(_KINDS)}, got {spec!r}")
        kind, weight = kinds[0], spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real) or not math.isfinite(weight):
            raise ConfigError(f"rewards[{i}].weight: expected a number, got {weight!r}")
        extra = set(spec) - {kind, "weight", "name"} - ({"timeout"} if kind == "http" else set()) \
            - ({"max_length", "batch_size"} if kind == "model" else set())
        if extra and kind != "builtin":
            raise ConfigError(f"rewards[{i}]: unknown keys {sorted(extra)} for a {kind} source")
        if kind == "function":
            fn, default = load_callable(spec["function"]), spec["function"].rpartition(":")[2]
        elif kind == "model":
            fn = model_source(spec["model"], spec.get("max_length", 1024), spec.get("batch_size", 16), device, dtype)
            default = "model"
        elif kind == "builtin":
            fn, default = _builtin(spec), spec["builtin"]
        else:
            fn, default = http_source(spec["http"], spec.get("timeout", 30.0)), "http"
        name, taken = spec.get("name", default), {s.name for s in sources}
        if name in taken:
            name = next(f"{name}_{n}" for n in range(2, len(specs) + 2) if f"{name}_{n}" not in taken)
        sources.append(RewardSource(name, fn, float(weight)))
    return sources


# --------------------------------------------------------------------------- scoring

def _item(names: list[str] | None, i: int) -> str:
    return names[i] if names else f"prompt {i}"


def _check(source: RewardSource, values, n: int, offset: int = 0, names: list[str] | None = None) -> list[float | None]:
    """The values as floats (None kept), or a DataError naming the source and the prompt index."""
    where = f"reward '{source.name}'"
    if not isinstance(values, (list, tuple)):
        raise DataError(f"returned {type(values).__name__}, expected a list of {n} numbers", where)
    if len(values) != n:
        raise DataError(f"returned {len(values)} values for {n} completions (prompts {offset}..{offset + n - 1})",
                        where)
    checked: list[float | None] = []
    for i, value in enumerate(values):
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise DataError(f"{_item(names, offset + i)}: returned {value!r}, not a number", where)
        if value is not None and not math.isfinite(float(value)):
            raise DataError(f"{_item(names, offset + i)}: returned {value}, rewards must be finite", where)
        checked.append(None if value is None else float(value))
    return checked


def _call(source: RewardSource, prompts, completions, columns, skip_invalid: bool,
          names: list[str] | None = None) -> list[float | None]:
    """Call on the whole batch; if the function raises, call it prompt by prompt to find the index (and,
    with skip_invalid, to keep the other prompts' rewards)."""
    try:
        return _check(source, source.fn(prompts, completions, **columns), len(prompts), names=names)
    except PosttrainError:
        raise
    except Exception:  # noqa: BLE001 - user code; located below
        pass
    values: list[float | None] = []
    for i in range(len(prompts)):
        one = {k: v[i:i + 1] for k, v in columns.items()}
        try:
            values += _check(source, source.fn(prompts[i:i + 1], completions[i:i + 1], **one), 1, i, names)
        except PosttrainError:
            raise
        except Exception as exc:  # noqa: BLE001
            if not skip_invalid:
                raise DataError(f"{_item(names, i)}: raised {type(exc).__name__}: {exc}",
                                f"reward '{source.name}'") from exc
            values.append(None)
    return values


def score(sources: list[RewardSource], prompts: list[str], completions: list[str], columns: dict[str, list],
          *, skip_invalid: bool = False, names: list[str] | None = None) -> tuple[list[float], dict]:
    """Weighted sum of the sources' rewards per completion, and metrics: `reward/<name>` (mean of the
    source's valid values) and, with skip_invalid, `reward/skipped` (values that were None or raised).
    `names` says how errors name each completion (default "prompt <index>")."""
    n = len(completions)
    if len(prompts) != n or any(len(v) != n for v in columns.values()):
        raise ValueError("prompts, completions and every column must have the same length")
    totals, metrics, skipped = [0.0] * n, {}, 0
    for source in sources:
        values = _call(source, prompts, completions, columns, skip_invalid, names)
        missing = [i for i, v in enumerate(values) if v is None]
        if missing and not skip_invalid:
            raise DataError(f"{_item(names, missing[0])}: returned None (no reward); set skip_invalid to count "
                            f"these as 0", f"reward '{source.name}'")
        skipped += len(missing)
        valid = [v for v in values if v is not None]
        metrics[f"reward/{source.name}"] = sum(valid) / len(valid) if valid else None
        totals = [t + source.weight * (v or 0.0) for t, v in zip(totals, values)]
    if skip_invalid:
        metrics["reward/skipped"] = skipped
    return totals, metrics
