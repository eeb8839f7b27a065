"""Reward sources for the online stages (ppo, grpo): where a completion's reward comes from.

A source is a function `(prompts, completions, **columns) -> list[float | None]`, one value per completion;
`columns` are the other dataset columns of the prompts' rows (e.g. `answer`, `tests`). `rewards:` in the
config is a list of specs, combined as a weighted sum:

    {function: "module:fn" | "path/to/file.py:fn", weight: 1.0}   a Python callable
    {model: DIR, weight: 1.0}                                      a reward model (stage rm output)
    {builtin: NAME, weight: 1.0, ...options}                       one of BUILTINS below
    {http: URL, weight: 1.0, timeout: 30}                          POST {prompts, completions, columns},
                                                                   answer {"rewards": [...]}
    {judge: {url, model, rubric, mode: pointwise|pairwise}}        a judge model behind an OpenAI-compatible
                                                                   endpoint scores (pointwise, 1..10 -> 0..1) or
                                                                   compares (pairwise: share of wins within the
                                                                   prompt's answers) by the rubric (Judge below)
Any spec may also carry `name:` (used in errors and in the `reward/<name>` metrics).

A value of None means "no reward for this completion": an error, unless skip_invalid (then it counts as 0
and is counted in the metrics). A function that raises, returns the wrong length, a non-number or NaN/inf
stops with an error naming the source and the prompt index.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import json
import logging
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


_KINDS = ("function", "model", "builtin", "http", "judge")


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
        elif kind == "judge":
            fn, default = judge_source(spec["judge"]), "judge"
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


# --------------------------------------------------------------------------- AI feedback: a judge model
# {judge: {url, model, rubric, mode: pointwise|pairwise, ...}}: a strong model behind any OpenAI-compatible
# endpoint (another `posttrain serve` included) scores or compares answers by written principles (RLAIF,
# Constitutional AI). Its verdicts are parsed leniently (several phrasings, markdown, a <think> block first);
# one that cannot be read is malformed: counted, logged, and returned as None (no reward), never as 0.

JUDGE_KEYS = {"url", "model", "rubric", "mode", "scale", "timeout", "max_tokens", "cache", "swap", "workers",
              "api_key_env"}
POINTWISE_INSTRUCTION = ("You judge answers by these principles:\n{rubric}\n\nRate the answer to the question. Reply "
                         "with one line: `Score: N`, N a whole number from 1 (worst) to {scale} (best).")
PAIRWISE_INSTRUCTION = ("You judge answers by these principles:\n{rubric}\n\nCompare two answers to the question. "
                        "Reply with one line: `Verdict: A`, `Verdict: B` or `Verdict: tie`.")
_THINK = re.compile(r"<think>.*?</think>", re.DOTALL | re.IGNORECASE)
_NUMBER = r"(\d+(?:\.\d+)?)"
_SCORE = re.compile(r"(?:score|rating|grade)\**\s*(?:is|=|:)?\s*\**\s*\[{0,2}" + _NUMBER + r"\]{0,2}"
                    r"(?:\s*(?:/|out of)\s*(\d+))?", re.IGNORECASE)
_VERDICT = re.compile(r"(?:verdict|winner|better answer|better|choice)\**\s*(?:is|=|:)?\s*\**\s*(?:answer\s+)?"
                      r"\[{0,2}\s*(A|B|tie)\b", re.IGNORECASE)


def _judge_text(text: str) -> str:
    return _THINK.sub(" ", str(text or "")).strip()


def parse_score(text: str, scale: int = 10) -> float | None:
    """The score in a judge's reply (1..scale), or None when it cannot be read: `Score: 7`, `**Rating:** 7/10`,
    `[[7]]`, a bare `7`, JSON {"score": 7}. The last explicit `score` phrase wins (judges restate)."""
    body = _judge_text(text)
    found = _SCORE.findall(body)
    value, out_of = (found[-1] if found else (None, None))
    if value is None:
        brackets = re.findall(r"\[\[" + _NUMBER + r"\]\]", body)
        whole = re.fullmatch(r"[\s*`]*" + _NUMBER + r"(?:\s*/\s*(\d+))?[\s*`.]*", body)
        if brackets:
            value = brackets[-1]
        elif whole:
            value, out_of = whole.group(1), whole.group(2)
        else:
            try:
                data = json.loads(body)
                value = data.get("score") if isinstance(data, dict) else None
            except ValueError:
                value = None
    try:
        number = float(value) if value is not None else None
    except (TypeError, ValueError):
        return None
    if number is None or (out_of and int(out_of) != scale) or not 1 <= number <= scale:
        return None
    return number


def parse_verdict(text: str) -> str | None:
    """"A", "B" or "tie" from a judge's reply, or None: `Verdict: A`, `**Winner**: B`, `[[A]]` (`[[C]]` = tie, as
    MT-Bench writes it), a bare `B.`, `Tie`. The last explicit verdict phrase wins."""
    body = _judge_text(text)
    found = _VERDICT.findall(body)
    if found:
        choice = found[-1]
    else:
        brackets = re.findall(r"\[\[\s*(A|B|C|tie)\s*\]\]", body, re.IGNORECASE)
        whole = re.fullmatch(r"[\s*`\"'(]*(A|B|tie)[\s*`\"').!]*", body, re.IGNORECASE)
        choice = brackets[-1] if brackets else whole.group(1) if whole else None
    if choice is None:
        return None
    choice = choice.lower()
    return "tie" if choice in ("tie", "c") else choice.upper()


class Judge:
    """Scores (pointwise) or compares (pairwise) answers through a judge model's chat completions. Well-formed
    verdicts are cached (in memory, and in the JSONL file `cache` when given) by the exact request, so asking
    again costs nothing. `stats` counts requests, cache hits and malformed verdicts; `malformed` keeps the last
    few unreadable replies."""

    def __init__(self, url: str, model: str, rubric: str, mode: str = "pointwise", scale: int = 10,
                 timeout: float = 60.0, max_tokens: int = 32, cache: str | None = None, swap: bool = True,
                 workers: int = 4, api_key_env: str | None = None):
        if mode not in ("pointwise", "pairwise"):
            raise ConfigError(f"judge mode {mode!r}: choose pointwise or pairwise")
        if not isinstance(scale, int) or scale < 2:
            raise ConfigError(f"judge scale must be an integer of at least 2, got {scale!r}")
        if not str(rubric or "").strip():
            raise ConfigError("judge: give a rubric (the principles to judge by, or a .txt/.md file of them)")
        rubric = str(rubric)
        if rubric.endswith((".txt", ".md")) and "\n" not in rubric:
            path = Path(rubric)
            if not path.is_file():
                raise ConfigError(f"judge rubric file not found: {path}")
            rubric = path.read_text(encoding="utf-8")
        base = str(url).rstrip("/")
        self.endpoint = base if base.endswith("/chat/completions") else \
            base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.rubric, self.mode, self.scale = model, rubric, mode, scale
        self.timeout, self.max_tokens, self.swap, self.workers = timeout, max_tokens, swap, max(1, workers)
        self.api_key = os.environ.get(api_key_env) if api_key_env else None
        if api_key_env and self.api_key is None:
            raise ConfigError(f"judge api_key_env: the environment variable {api_key_env} is not set")
        self.stats = {"requests": 0, "cached": 0, "malformed": 0}
        self.malformed: list[str] = []
        self.cache_path = Path(cache) if cache else None
        self.cache: dict[str, str] = {}
        if self.cache_path is not None and self.cache_path.is_file():
            for line in self.cache_path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                    self.cache[entry["key"]] = entry["verdict"]
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short: asked again

    # ------------------------------------------------------------ one verdict
    def _messages(self, prompt: str, answers: list[str]) -> list[dict]:
        if self.mode == "pointwise":
            system = POINTWISE_INSTRUCTION.format(rubric=self.rubric, scale=self.scale)
            user = f"Question:\n{prompt}\n\nAnswer:\n{answers[0]}"
        else:
            system = PAIRWISE_INSTRUCTION.format(rubric=self.rubric)
            user = f"Question:\n{prompt}\n\nAnswer A:\n{answers[0]}\n\nAnswer B:\n{answers[1]}"
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]

    def _ask(self, messages: list[dict]):
        """The parsed verdict (a score or "A"/"B"/"tie") for one request, or None when malformed."""
        key = hashlib.sha256(json.dumps([self.model, self.mode, self.scale, messages]).encode()).hexdigest()
        if key in self.cache:
            self.stats["cached"] += 1
            return self.cache[key]
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": self.max_tokens}).encode()
        headers = {"Content-Type": "application/json",
                   **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {})}
        request = urllib.request.Request(self.endpoint, data=body, headers=headers)
        self.stats["requests"] += 1
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                answer = json.loads(response.read())
            text = answer["choices"][0]["message"]["content"] or ""
        except urllib.error.HTTPError as exc:
            detail = exc.read().decode("utf-8", "replace")[:300]
            raise DataError(f"HTTP {exc.code} {exc.reason}: {detail}", f"judge {self.endpoint}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ConfigError(f"judge {self.endpoint}: cannot reach it: {getattr(exc, 'reason', exc)}") from None
        except (ValueError, KeyError, IndexError, TypeError):
            raise DataError("the answer is not an OpenAI chat completion", f"judge {self.endpoint}") from None
        verdict = parse_score(text, self.scale) if self.mode == "pointwise" else parse_verdict(text)
        if verdict is None:
            self.stats["malformed"] += 1
            self.malformed = (self.malformed + [text])[-5:]
            return None
        self.cache[key] = verdict
        if self.cache_path is not None:
            self.cache_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.cache_path, "a", encoding="utf-8") as handle:  # one line per write: whole or cut
                handle.write(json.dumps({"key": key, "verdict": verdict}) + "\n")
        return verdict

    def _ask_all(self, requests: list[list[dict]]) -> list:
        malformed_before = self.stats["malformed"]
        with ThreadPoolExecutor(self.workers) as pool:
            verdicts = list(pool.map(self._ask, requests))
        new = self.stats["malformed"] - malformed_before
        if new:
            logging.getLogger("posttrain").warning(
                "judge %s: %d of %d verdicts malformed (no reward for them); last reply: %r", self.model, new,
                len(requests), self.malformed[-1][:200])
        return verdicts

    # ------------------------------------------------------------ scores and rankings
    def scores(self, prompts: list[str], responses: list[list[str]]) -> list[list[float | None]]:
        """Per prompt, one score in [0, 1] per response (None: malformed verdicts only). Pointwise: (score - 1) /
        (scale - 1); pairwise: the share of comparisons with the prompt's other responses won (a tie counts half;
        with `swap` each pair is asked in both orders, so the position of an answer does not decide)."""
        if self.mode == "pointwise":
            flat = self._ask_all([self._messages(p, [r]) for p, rs in zip(prompts, responses) for r in rs])
            out, start = [], 0
            for rs in responses:
                out.append([None if v is None else (v - 1) / (self.scale - 1) for v in flat[start:start + len(rs)]])
                start += len(rs)
            return out
        jobs = []  # (prompt index, i, j, i shown first)
        for n, rs in enumerate(responses):
            if len(rs) < 2:
                raise DataError("a pairwise judge compares answers to the same prompt; this prompt has only one "
                                "(use mode: pointwise here)", f"prompt {n}")
            for i in range(len(rs)):
                for j in range(i + 1, len(rs)):
                    jobs += [(n, i, j, True)] + ([(n, i, j, False)] if self.swap else [])
        verdicts = self._ask_all([self._messages(prompts[n], [responses[n][i], responses[n][j]] if first
                                                 else [responses[n][j], responses[n][i]]) for n, i, j, first in jobs])
        wins = [[[0.0, 0] for _ in rs] for rs in responses]
        for (n, i, j, first), verdict in zip(jobs, verdicts):
            if verdict is None:
                continue
            i_won = {"tie": 0.5, "A": 1.0 if first else 0.0, "B": 0.0 if first else 1.0}[verdict]
            for who, share in ((i, i_won), (j, 1.0 - i_won)):
                wins[n][who][0] += share
                wins[n][who][1] += 1
        return [[won / count if count else None for won, count in group] for group in wins]

    def rank(self, prompt: str, responses: list[str]) -> tuple[list[int | None], list[float | None]]:
        """The judge's ranking of one prompt's responses: ranks (1 = best, equal scores share a rank, None =
        no readable verdict) and the scores behind them."""
        scores = self.scores([prompt], [responses])[0]
        order = sorted({s for s in scores if s is not None}, reverse=True)
        return [None if s is None else order.index(s) + 1 for s in scores], scores

    def __call__(self, prompts, completions, **columns) -> list[float | None]:
        """The reward source: pointwise per completion; pairwise within each run of consecutive completions of
        one prompt (GRPO's groups, a `rank` step's responses)."""
        if self.mode == "pointwise":
            return [s[0] for s in self.scores(list(prompts), [[c] for c in completions])]
        groups: list[list[int]] = []
        for k, prompt in enumerate(prompts):
            if groups and prompts[groups[-1][0]] == prompt:
                groups[-1].append(k)
            else:
                groups.append([k])
        scores = self.scores([prompts[g[0]] for g in groups], [[completions[k] for k in g] for g in groups])
        values: list[float | None] = [None] * len(completions)
        for group, group_scores in zip(groups, scores):
            for k, s in zip(group, group_scores):
                values[k] = s
        return values


def judge_source(spec) -> Judge:
    """`{judge: {url, model, rubric, mode, ...}}` -> a Judge (see JUDGE_KEYS)."""
    if not isinstance(spec, dict):
        raise ConfigError("judge: expected a mapping {url, model, rubric, mode: pointwise|pairwise}")
    unknown, missing = set(spec) - JUDGE_KEYS, {"url", "model", "rubric"} - set(spec)
    if unknown or missing:
        raise ConfigError(f"judge: keys are {sorted(JUDGE_KEYS)}" + (f"; unknown: {sorted(unknown)}" if unknown else "")
                          + (f"; missing: {sorted(missing)}" if missing else ""))
    return Judge(**spec)
