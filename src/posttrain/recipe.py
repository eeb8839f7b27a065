"""`posttrain run RECIPE.yaml`: named steps run in order, each skipped when nothing it depends on changed.

    out: runs/example                 # each step writes under OUT/<name>/ (default: runs/<recipe name>)
    vars: {data: examples/data}       # ${vars.data} anywhere below
    steps:
      - name: sft                     # a train step: a `posttrain train` config, inline and/or from a file
        kind: train
        config: examples/sft.yaml     # optional; inline keys are merged into it, then `overrides` applied
        overrides: {train.max_steps: 2}
        model: out/pt
      - name: candidates              # other kinds: init-model, generate, rank, pairs, score, eval, rag-index,
                                      # rag-sft-data, init-encoder, rag-pairs, rag-eval
        kind: generate
        model: ${sft.output}          # an earlier step's output (a directory or a file)
        prompts: ${vars.data}/sft_eval.jsonl

    report: mymodule:write_report     # optional: called as write_report(out, results, minutes, vars) at the end

A step is skipped when its lineage.json (written last, after the step finished) records the same resolved
config, the same content hashes of every file or directory the config names (earlier outputs included) and
an output that is still there unchanged. So an edit reruns that step and, through the content of its
output, every step that reads it. `from_step` forces a rerun from that step on. Relative paths are relative
to the working directory, as for `posttrain train`. The whole recipe (kinds, keys, references, every train
config) is validated before the first step runs. While it runs, each step's line says where the recipe
stands: "step 5 of 16: sft", the time elapsed and an estimate of the time left (from each step's last
recorded runtime, else the mean of the steps run so far).
"""
from __future__ import annotations

import copy
import difflib
import hashlib
import importlib
import json
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict, ValidationError

from .errors import ConfigError

log = logging.getLogger("posttrain")

REFERENCE = re.compile(r"\$\{([^}]*)\}")
LINEAGE = "lineage.json"
TOP_LEVEL = ("out", "vars", "steps", "report")
NOT_HASHED = {LINEAGE, "checkpoints"}  # training checkpoints are a means, not part of the result


# ---------------------------------------------------------------- step kinds: their keys and what they run

class _Keys(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InitModelStep(_Keys):
    tokenizer_corpus: str | list[str]
    arch: str = "qwen2"
    size: str = "tiny"
    vocab_size: int = 2048
    seed: int = 0


class GenerateStep(_Keys):
    model: str
    prompts: str
    adapter: str | None = None
    n: int = 4
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = 0
    stop: list[str] = []
    batch_size: int = 8
    chat_template: str | None = None


class RankStep(_Keys):
    input: str
    rewards: list[dict]
    skip_invalid: bool = False
    tie_within: float = 0.0


class PairsStep(_Keys):
    input: str


class ScoreStep(_Keys):
    model: str
    data: str
    max_length: int = 1024
    batch_size: int = 16


class EvalStep(_Keys):
    model: str
    adapter: str | None = None
    tasks: str | None = None
    data: str | None = None
    pairs: str | None = None
    reward_model: str | None = None
    reference: str | None = None
    max_new_tokens: int = 64
    n_samples: int | None = None
    batch_size: int = 16
    max_length: int = 1024
    checker: str | None = None
    samples: int = 0
    temperature: float = 1.0
    seed: int = 0


def _run_init_model(cfg: dict, out: Path) -> dict:
    from .init_model import init_model, read_corpus

    corpus = cfg["tokenizer_corpus"]
    init_model(cfg["arch"], cfg["size"], read_corpus(corpus if isinstance(corpus, list) else [corpus]), out,
               vocab_size=cfg["vocab_size"], seed=cfg["seed"])
    return {"arch": cfg["arch"], "size": cfg["size"]}


def _run_train(cfg: dict, out: Path) -> dict:
    from .config import build_config
    from .train import run_training

    # the recipe owns the step's directory: a step that reruns replaces its earlier output
    return run_training(build_config({**cfg, "overwrite_output_dir": True}))


def _run_generate(cfg: dict, out: Path) -> dict:
    from .engine import SamplingParams
    from .generate import generate_file

    params = SamplingParams(max_new_tokens=cfg["max_new_tokens"], temperature=cfg["temperature"],
                            top_p=cfg["top_p"], top_k=cfg["top_k"], stop=cfg["stop"], seed=cfg["seed"], n=cfg["n"])
    return generate_file(cfg["model"], cfg["prompts"], str(out), params, adapter=cfg["adapter"],
                         batch_size=cfg["batch_size"], chat_template=cfg["chat_template"])


def _run_rank(cfg: dict, out: Path) -> dict:
    return rank_file(cfg["input"], str(out), cfg["rewards"], skip_invalid=cfg["skip_invalid"],
                     tie_within=cfg["tie_within"])


PER_RESPONSE = ("finish_reasons", "logprobs")  # generate's per-response columns, reordered with the responses


def _prompt_text(prompt) -> str:
    """What a reward source sees as the prompt: the string, or the last user message of a message list."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


def rank_file(candidates: str, out: str, rewards: list[dict], skip_invalid: bool = False,
              tie_within: float = 0.0) -> dict:
    """Order each row's responses best to worst by the reward sources (the stand-in for human rankers) and
    write rankings rows {prompt, responses, ranks, scores, ...}: equal scores share a rank (a tie), the
    format `posttrain data pairs` reads. With `tie_within` > 0 scores are compared by bins of that width
    (floor(score / tie_within)), so answers that score almost the same tie instead of making a noisy pair."""
    from .data.sources import read_rows
    from .errors import DataError
    from .rl.rewards import build_sources, score

    rows = read_rows(candidates)
    for row in rows:
        responses = row.data.get("responses")
        if "prompt" not in row.data or not isinstance(responses, list) or len(responses) < 2:
            raise DataError("a row to rank needs a prompt and a list of at least 2 responses "
                            "(what `posttrain generate` writes with --n 2 or more)", location=row.location)
    skip = {"prompt", "responses", "ranks", "scores", *PER_RESPONSE}
    names = list(dict.fromkeys(k for row in rows for k in row.data if k not in skip))
    flat = [(row, text) for row in rows for text in row.data["responses"]]
    columns = {k: [row.data.get(k) for row, _ in flat] for k in names}
    totals, metrics = score(build_sources(rewards), [_prompt_text(row.data["prompt"]) for row, _ in flat],
                            [str(text) for _, text in flat], columns, skip_invalid=skip_invalid)
    written, start, tied = [], 0, 0
    for row in rows:
        k = len(row.data["responses"])
        scores, start = totals[start:start + k], start + k
        level = [math.floor(v / tie_within + 1e-9) if tie_within > 0 else v for v in scores]
        order = sorted(range(k), key=lambda i: (-level[i], -scores[i]))  # stable: equal scores keep sampled order
        ranks = [1]
        for a, b in zip(order, order[1:]):
            ranks.append(ranks[-1] + (level[b] != level[a]))
        tied += ranks[-1] == 1
        record = {"prompt": row.data["prompt"], "responses": [row.data["responses"][i] for i in order],
                  "ranks": ranks, "scores": [scores[i] for i in order],
                  **{key: v for key, v in row.data.items() if key not in skip}}
        for key in PER_RESPONSE:
            if isinstance(row.data.get(key), list) and len(row.data[key]) == k:
                record[key] = [row.data[key][i] for i in order]
        written.append(record)
    path = Path(out)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in written), encoding="utf-8")
    partial.replace(path)
    return {"rows": len(rows), "responses": len(flat), "all_tied": tied,
            "mean_reward": sum(totals) / max(len(totals), 1), **metrics}


def _run_pairs(cfg: dict, out: Path) -> dict:
    from .data.preference import write_pairs

    partial = out.with_name(f".{out.name}.partial")
    counts = write_pairs(cfg["input"], partial)
    partial.replace(out)
    return counts


def _run_score(cfg: dict, out: Path) -> dict:
    from .score import score_file

    return score_file(cfg["model"], cfg["data"], str(out), max_length=cfg["max_length"],
                      batch_size=cfg["batch_size"])


def _run_eval(cfg: dict, out: Path) -> dict:
    from .evaluate import evaluate, write_result

    result = evaluate(**cfg, generations_out=str(out.with_name("generations.jsonl")))
    write_result(result, str(out))
    return result


class RagIndexStep(_Keys):
    paths: str | list[str]
    embedder: str | None = None
    chunk_tokens: int = 256
    overlap: int = 32
    rebuild: bool = False  # start afresh: a rerun after the embedder changed (else refused: two vector spaces)


class RagSftDataStep(_Keys):
    index: str | list[str]  # several indexes (e.g. a knowledge base on several days): one questions file each
    questions: str | list[str]
    k: int = 3
    no_answer: float = 0.2
    seed: int = 0
    mode: str | None = None
    template: str | None = None


class InitEncoderStep(_Keys):
    corpus: str | list[str]
    hidden: int = 64
    layers: int = 2
    heads: int = 2
    vocab_size: int = 2000
    max_length: int = 256
    pooling: str = "mean"
    seed: int = 0


class RagPairsStep(_Keys):
    index: str
    questions: str
    negatives: bool = True


class RagEvalStep(_Keys):
    index: str
    questions: str
    k: int = 5
    modes: list[str] | None = None
    model: str | None = None
    answer_k: int | None = None  # chunks in the prompt when `model` answers (default: k)
    max_new_tokens: int = 64
    batch_size: int = 8
    template: str | None = None


def _run_init_encoder(cfg: dict, out: Path) -> dict:
    from .init_model import read_corpus
    from .rag.embed import init_encoder

    corpus = cfg.pop("corpus")
    init_encoder(read_corpus(corpus if isinstance(corpus, list) else [corpus]), out, **cfg)
    return {"hidden": cfg["hidden"], "layers": cfg["layers"], "pooling": cfg["pooling"]}


def _run_rag_pairs(cfg: dict, out: Path) -> dict:
    from .rag.pairs import pairs_from_questions

    return pairs_from_questions(cfg["index"], cfg["questions"], str(out), negatives=cfg["negatives"])


def _run_rag_eval(cfg: dict, out: Path) -> dict:
    """Retrieval metrics at k for every mode; with a model, answer accuracy without and with retrieval (the
    first mode, `answer_k` chunks in the prompt)."""
    from .rag.evaluate import evaluate_rag, write_result

    model, answer_k = cfg.pop("model"), cfg.pop("answer_k")
    index, questions = cfg.pop("index"), cfg.pop("questions")
    common = {"max_new_tokens": cfg.pop("max_new_tokens"), "batch_size": cfg.pop("batch_size"),
              "template": cfg.pop("template")}
    result = evaluate_rag(index, questions, k=cfg["k"], modes=cfg["modes"], **common)
    if model:
        answers = evaluate_rag(index, questions, k=answer_k or cfg["k"], modes=(cfg["modes"] or [])[:1] or None,
                               model=model, **common)
        result.update({key: answers[key] for key in ("model", "answered", "answer_accuracy_without_rag",
                                                     "answer_accuracy_with_rag")},
                      answer_k=answers["k"], answer_mode=answers["mode"])
    write_result(result, str(out))
    return result


def _run_rag_index(cfg: dict, out: Path) -> dict:
    from .rag.index import build_index

    paths = cfg.pop("paths")
    report = build_index(paths if isinstance(paths, list) else [paths], str(out), **cfg)
    return {"chunks": report.chunks, "new": len(report.added), "changed": len(report.changed),
            "removed": len(report.removed), "skipped": len(report.skipped) + len(report.problems)}


def _run_rag_sft_data(cfg: dict, out: Path) -> dict:
    """One file of rows; with lists, each index with its questions file (seeds seed, seed + 1, ...)."""
    from .rag.sft_data import make_sft_data

    indexes, questions = cfg.pop("index"), cfg.pop("questions")
    if isinstance(indexes, str) and isinstance(questions, str):
        return make_sft_data(indexes, questions, str(out), **cfg)
    indexes, questions = [indexes] if isinstance(indexes, str) else indexes, \
        [questions] if isinstance(questions, str) else questions
    if len(indexes) != len(questions):
        raise ConfigError(f"rag-sft-data: {len(indexes)} indexes but {len(questions)} questions files (one each)")
    totals: dict = {}
    partial = out.with_name(f".{out.name}.partial")
    with open(partial, "w", encoding="utf-8") as handle:
        for i, (index, path) in enumerate(zip(indexes, questions)):
            part = out.with_name(f".{out.name}.{i}")
            counts = make_sft_data(index, path, str(part), **{**cfg, "seed": cfg["seed"] + i})
            handle.write(part.read_text(encoding="utf-8"))
            part.unlink()
            totals = {key: totals.get(key, 0) + value for key, value in counts.items()}
    partial.replace(out)
    return totals


@dataclass(frozen=True)
class Kind:
    keys: type[_Keys] | None  # None: a `posttrain train` config, validated by config.build_config
    output: str | None  # the file the step writes in its directory; None: the directory is the output
    run: Callable[[dict, Path], dict]


KINDS = {
    "init-model": Kind(InitModelStep, None, _run_init_model),
    "train": Kind(None, None, _run_train),
    "generate": Kind(GenerateStep, "candidates.jsonl", _run_generate),
    "rank": Kind(RankStep, "rankings.jsonl", _run_rank),
    "pairs": Kind(PairsStep, "pairs.jsonl", _run_pairs),
    "score": Kind(ScoreStep, "scored.jsonl", _run_score),
    "eval": Kind(EvalStep, "eval.json", _run_eval),
    "rag-index": Kind(RagIndexStep, "index.db", _run_rag_index),  # incremental when rerun on changed files
    "rag-sft-data": Kind(RagSftDataStep, "sft.jsonl", _run_rag_sft_data),
    "init-encoder": Kind(InitEncoderStep, None, _run_init_encoder),  # a random encoder to train with stage: embed
    "rag-pairs": Kind(RagPairsStep, "pairs.jsonl", _run_rag_pairs),  # (question, chunk) pairs for stage: embed
    "rag-eval": Kind(RagEvalStep, "rag_eval.json", _run_rag_eval),
}


# ---------------------------------------------------------------- reading and resolving a recipe

@dataclass
class Step:
    name: str
    kind: str
    config: dict  # resolved: references replaced, defaults filled in
    dir: Path  # where lineage.json goes
    output: Path  # what ${name.output} means
    parents: list[str] = field(default_factory=list)  # earlier steps this one refers to


def _suggest(word: str, choices, what: str) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f"; did you mean {close[0]!r}?" if close else f" ({what}: {', '.join(map(str, choices)) or 'none'})"


def _load(recipe: str | Path | dict) -> tuple[dict, str]:
    if isinstance(recipe, dict):
        return copy.deepcopy(recipe), "recipe"
    from .config import read_yaml

    path = Path(recipe)
    if not path.is_file():
        raise ConfigError(f"recipe not found: {path}")
    raw = read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with 'steps' (and optionally 'out', 'vars')")
    return raw, path.stem


def _substitute(value: Any, lookup: Callable[[str], Any]) -> Any:
    """Replace every ${...} in the strings of a nested structure; a string that is one reference and
    nothing else takes the value itself (so `n: ${vars.n}` stays a number)."""
    if isinstance(value, str):
        whole = REFERENCE.fullmatch(value)
        if whole:
            return lookup(whole.group(1).strip())
        return REFERENCE.sub(lambda m: str(lookup(m.group(1).strip())), value)
    if isinstance(value, list):
        return [_substitute(v, lookup) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, lookup) for k, v in value.items()}
    return value


def _merge(base: dict, extra: dict) -> dict:
    """extra's keys over base's, section by section."""
    merged = dict(base)
    for key, value in extra.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) \
            else value
    return merged


def _train_config(name: str, body: dict, out: Path) -> dict:
    """A train step's config: the file (if any), inline keys merged in, then overrides; output_dir defaults
    to the step's directory (an output_dir in the config file is replaced: the recipe owns the layout)."""
    from .config import apply_overrides, build_config, read_yaml

    raw: dict = {}
    if "config" in body:
        path = Path(str(body.pop("config")))
        if not path.is_file():
            raise ConfigError(f"step {name!r}: config file not found: {path}")
        raw = read_yaml(path) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"step {name!r}: {path}: the top level must be a mapping of keys")
        raw.pop("output_dir", None)
    overrides = body.pop("overrides", None) or []
    raw = _merge(raw, body)
    raw.setdefault("output_dir", str(out))
    if isinstance(overrides, dict):
        overrides = [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    if not isinstance(overrides, list):
        raise ConfigError(f"step {name!r}: 'overrides' must be a list of key=value or a mapping")
    raw = apply_overrides(raw, [str(o) for o in overrides])
    try:
        config = build_config(raw)
    except ConfigError as exc:
        raise ConfigError(f"step {name!r}: " + "; ".join(line.strip() for line in str(exc).splitlines()
                                                         if line.strip() != "invalid config:")) from None
    dumped = config.model_dump(mode="json")
    dumped.pop("overwrite_output_dir")  # always on in a recipe (see _run_train), so not part of the hash
    for section in set(STAGE_SECTIONS.get("all", ())) - set(STAGE_SECTIONS.get(config.stage, ())):
        dumped.pop(section, None)  # another stage's settings: a change to their defaults reruns nothing here
    return dumped


# the config sections only some stages read (the rest: every stage); a train step's hash leaves out the others
STAGE_SECTIONS = {"rm": ("rm",), "dpo": ("dpo",), "kto": ("kto",), "ppo": ("ppo", "generation", "rewards"),
                  "grpo": ("grpo", "generation", "rewards"),
                  "all": ("rm", "dpo", "kto", "ppo", "grpo", "generation", "rewards")}


def _keys_config(name: str, kind: str, body: dict) -> dict:
    try:
        return KINDS[kind].keys.model_validate(body).model_dump(mode="json")
    except ValidationError as exc:
        error = exc.errors()[0]
        key = ".".join(str(p) for p in error["loc"])
        if error["type"] == "extra_forbidden":
            valid = ["name", "kind", *KINDS[kind].keys.model_fields]
            raise ConfigError(f"step {name!r}: unknown key {key!r} for a {kind} step"
                              f"{_suggest(key, valid, 'valid keys')}") from None
        if error["type"] == "missing":
            raise ConfigError(f"step {name!r}: missing required key {key!r} for a {kind} step") from None
        raise ConfigError(f"step {name!r}: {key!r}: {error['msg']} (got {error.get('input')!r})") from None


def resolve(recipe: str | Path | dict, out: str | Path | None = None) -> list[Step]:
    """Read, substitute and validate every step (nothing runs); a problem is a one-line ConfigError."""
    raw, default_name = _load(recipe)
    for key in raw:
        if key not in TOP_LEVEL:
            raise ConfigError(f"recipe: unknown key {key!r}{_suggest(key, TOP_LEVEL, 'valid keys')}")
    root = Path(str(out or raw.get("out") or Path("runs") / default_name))
    variables = raw.get("vars") or {}
    steps_raw = raw.get("steps")
    if not isinstance(variables, dict):
        raise ConfigError("recipe: 'vars' must be a mapping of names to values")
    if not isinstance(steps_raw, list) or not steps_raw:
        raise ConfigError("recipe: 'steps' must be a non-empty list of steps, each with a 'name' and a 'kind'")
    names = [s.get("name") if isinstance(s, dict) else None for s in steps_raw]
    for i, (step, name) in enumerate(zip(steps_raw, names)):
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][\w-]*", name):
            raise ConfigError(f"recipe: steps[{i}] needs a 'name' (letters, digits, _ and -), got {name!r}")
        if name in names[:i] or name == "vars":
            raise ConfigError(f"recipe: step name {name!r} is used twice" if name != "vars"
                              else "recipe: 'vars' cannot be a step name")
    steps: list[Step] = []
    for i, body in enumerate(steps_raw):
        name, body = names[i], dict(body)
        body.pop("name")
        kind = body.pop("kind", "train" if "stage" in body or "config" in body else None)
        if kind not in KINDS:
            hint = _suggest(str(kind), KINDS, "kinds") if kind else f" (kinds: {', '.join(KINDS)})"
            raise ConfigError(f"step {name!r}: {'unknown kind ' + repr(kind) if kind else 'missing kind'}{hint}")
        step_dir = root / name
        parents: list[str] = []

        def lookup(ref: str, name=name, i=i, parents=parents) -> Any:
            head, _, attr = ref.partition(".")
            if head == "vars":
                if attr not in variables:
                    raise ConfigError(f"step {name!r}: unknown variable ${{{ref}}}"
                                      f"{_suggest(attr, variables, 'vars')}")
                return variables[attr]
            if head == name:
                raise ConfigError(f"step {name!r} refers to its own output ${{{ref}}} (a cycle)")
            if head in names[i + 1:]:
                raise ConfigError(f"step {name!r} refers to ${{{ref}}}, but step {head!r} runs later (a forward "
                                  f"reference or a cycle; steps run in the order written)")
            done = {s.name: s for s in steps}
            if head not in done:
                raise ConfigError(f"step {name!r}: unknown reference ${{{ref}}}"
                                  f"{_suggest(head, [*done, 'vars'], 'earlier steps')}")
            if attr != "output":
                raise ConfigError(f"step {name!r}: ${{{ref}}}: a step has only '.output'"
                                  + (f"; did you mean ${{{head}.output}}?" if attr else ""))
            parents.append(head)
            return str(done[head].output)

        body = _substitute(body, lookup)
        if KINDS[kind].keys is None:
            config = _train_config(name, body, step_dir)
            output = Path(config["output_dir"])
            step_dir = output
        else:
            config = _keys_config(name, kind, body)
            output = step_dir / KINDS[kind].output if KINDS[kind].output else step_dir
        steps.append(Step(name, kind, config, step_dir, output, list(dict.fromkeys(parents))))
    return steps


# ---------------------------------------------------------------- content hashes and lineage

def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.is_file()
                  and not any(part in NOT_HASHED or part.startswith(".") for part in p.relative_to(path).parts))


def signature(path: Path) -> str:
    """A cheap fingerprint from names, sizes and modification times (to avoid re-hashing big outputs)."""
    digest = hashlib.sha256()
    for f in _files(path):
        stat = f.stat()
        digest.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{stat.st_size}\0{stat.st_mtime_ns}\n"
                      .encode())
    return digest.hexdigest()


def content_hash(path: Path) -> str:
    """sha256 over every file's relative name and bytes (a directory: all files, sorted)."""
    digest = hashlib.sha256()
    for f in _files(path):
        digest.update(f"{f.relative_to(path) if path.is_dir() else ''}\0".encode())
        with open(f, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _paths_in(value: Any) -> list[str]:
    """Every string in a config that names an existing file or directory (also 'file.py:function')."""
    if isinstance(value, dict):
        return [p for v in value.values() for p in _paths_in(v)]
    if isinstance(value, list):
        return [p for v in value for p in _paths_in(v)]
    if isinstance(value, str) and value and "\n" not in value:
        candidate = value.rpartition(":")[0] if ":" in value and not Path(value).exists() else value
        if candidate and Path(candidate).exists():
            return [candidate]
    return []


def read_lineage(directory: Path) -> dict | None:
    try:
        return json.loads((directory / LINEAGE).read_text())
    except (OSError, ValueError):
        return None


class Hasher:
    """Content hashes, reusing what a completed step recorded for its output while its fingerprint holds."""

    def __init__(self):
        self.known: dict[str, tuple[str, str]] = {}  # path -> (signature, hash)

    def remember(self, path: Path, sig: str, digest: str) -> None:
        self.known[str(path)] = (sig, digest)

    def __call__(self, path: Path) -> str:
        sig = signature(path)
        cached = self.known.get(str(path))
        if cached and cached[0] == sig:
            return cached[1]
        digest = content_hash(path)
        self.known[str(path)] = (sig, digest)
        return digest


def _config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def _inputs(step: Step, hasher: Hasher) -> dict[str, str]:
    """{path: content hash} of every file or directory the step's config names (not its own output). A big
    input (a base model) is re-hashed only when its fingerprint differs from the one the last run recorded."""
    previous = read_lineage(step.dir) or {}
    for path, sig in (previous.get("input_signatures") or {}).items():
        if path in previous.get("inputs", {}) and path not in hasher.known:
            hasher.remember(Path(path), sig, previous["inputs"][path])
    own = {str(step.output), str(step.dir)}
    return {p: hasher(Path(p)) for p in dict.fromkeys(_paths_in(step.config)) if p not in own}


def _unchanged(step: Step, inputs: dict, hasher: Hasher) -> dict | None:
    """The completed lineage when the step can be skipped, else None."""
    lineage = read_lineage(step.dir)
    if not lineage or lineage.get("config_hash") != _config_hash(step.config) or lineage.get("inputs") != inputs:
        return None
    if not step.output.exists():
        return None
    hasher.remember(step.output, lineage.get("output_signature", ""), lineage.get("output_hash", ""))
    return lineage if hasher(step.output) == lineage.get("output_hash") else None


def _summary(lineage: dict) -> dict:
    """What a child records about a parent: everything but the parent's result, recursively."""
    return {k: v for k, v in lineage.items() if k not in ("result",)}


# ---------------------------------------------------------------- running

def run_recipe(recipe: str | Path | dict, from_step: str | None = None, out: str | Path | None = None) -> dict:
    """Run the recipe's steps in order; returns {step name: {"kind", "output", "skipped", "result",
    "lineage"}} where result is what the step returned (a training summary, counts, eval metrics)."""
    from . import __version__

    steps = resolve(recipe, out)
    raw, default_name = _load(recipe)
    report = _report_function(raw.get("report"))
    names = [s.name for s in steps]
    if from_step is not None and from_step not in names:
        raise ConfigError(f"--from: no step {from_step!r}{_suggest(from_step, names, 'steps')}")
    forced = set(names[names.index(from_step):]) if from_step else set()
    hasher, results, lineages = Hasher(), {}, {}
    progress = Progress(steps, forced)
    for step in steps:
        inputs = _inputs(step, hasher)
        lineage = None if step.name in forced else _unchanged(step, inputs, hasher)
        skipped = lineage is not None
        if skipped:
            log.info("== %s: unchanged, skipped -> %s", progress.line(step), step.output)
        else:
            log.info("== %s: running -> %s", progress.line(step), step.output)
            lineage = _run_step(step, inputs, hasher, lineages, __version__)
        progress.done(step, ran=not skipped)
        lineages[step.name] = lineage
        results[step.name] = {"kind": step.kind, "output": str(step.output), "skipped": skipped,
                              "result": lineage.get("result"), "lineage": str(step.dir / LINEAGE)}
    ran = [n for n, r in results.items() if not r["skipped"]]
    log.info("recipe done in %s: %d steps ran (%s), %d skipped", _minutes(progress.elapsed()), len(ran),
             ", ".join(ran) or "none", len(steps) - len(ran))
    if report is not None:
        root = Path(str(out or raw.get("out") or Path("runs") / default_name))
        report(root, results, progress.elapsed() / 60, raw.get("vars") or {})
    return results


def _report_function(spec: str | None) -> Callable | None:
    """The recipe's `report: module:function`, imported before any step runs."""
    if spec is None:
        return None
    module_name, _, name = str(spec).partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name, None) if name else None
    except ImportError as exc:
        raise ConfigError(f"recipe: report {spec!r}: cannot import {module_name!r} ({exc})") from None
    if not callable(function):
        raise ConfigError(f"recipe: report {spec!r}: expected 'module:function' naming a function")
    return function


def _minutes(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.1f} min"


class Progress:
    """Where a recipe run stands: "step 5 of 16: sft (train), 3.2 min elapsed, about 6.0 min left". A step
    still to come is expected to take what its last run took (lineage.json's runtime_s); a step that never
    ran before, the mean of this run's steps of its kind (or of all its steps), and the estimate is marked
    rough; one that will probably be skipped (complete, not forced, nothing before it rerun) counts as 0."""

    def __init__(self, steps: list[Step], forced: set[str]):
        self.steps, self.forced, self.started = steps, forced, time.time()
        self.history = {s.name: (read_lineage(s.dir) or {}).get("runtime_s") for s in steps}
        self.runtimes: dict[str, list[float]] = {}  # kind -> seconds of each step of that kind run so far
        self.step_started = self.started

    def elapsed(self) -> float:
        return time.time() - self.started

    def line(self, step: Step) -> str:
        self.step_started = time.time()
        index = self.steps.index(step) + 1
        text = f"step {index} of {len(self.steps)}: {step.name} ({step.kind}), {_minutes(self.elapsed())} elapsed"
        left, rough = self.left(step)
        if left is None:
            return text
        return text + f", about {_minutes(left)} left" + (" (rough)" if rough else "")

    def left(self, current: Step) -> tuple[float | None, bool]:
        """Expected seconds from the start of `current` to the end of the recipe (None: no idea yet), and
        whether the estimate is rough."""
        measured = [s for times in self.runtimes.values() for s in times]
        total, rough = 0.0, False
        for step in self.steps[self.steps.index(current):]:
            if self.history[step.name] is not None and step.name not in self.forced and not measured:
                continue  # probably skipped
            if self.history[step.name] is not None:
                total += self.history[step.name]
                continue
            same_kind = self.runtimes.get(step.kind) or measured
            if not same_kind:
                return None, True
            total, rough = total + sum(same_kind) / len(same_kind), True
        return total, rough

    def done(self, step: Step, ran: bool) -> None:
        if ran:
            self.runtimes.setdefault(step.kind, []).append(time.time() - self.step_started)


def _run_step(step: Step, inputs: dict, hasher: Hasher, lineages: dict, version: str) -> dict:
    (step.dir / LINEAGE).unlink(missing_ok=True)  # from here on the old output no longer counts as complete
    step.dir.mkdir(parents=True, exist_ok=True)
    pending = _drop_stale_checkpoints(step, inputs)
    started = time.time()
    result = KINDS[step.kind].run(copy.deepcopy(step.config), step.output)
    sig = signature(step.output)
    digest = content_hash(step.output)
    hasher.remember(step.output, sig, digest)
    lineage = {"step": step.name, "kind": step.kind, "config": step.config, "config_hash": _config_hash(step.config),
               "inputs": inputs, "input_signatures": {p: hasher.known[p][0] for p in inputs if p in hasher.known},
               "output": str(step.output), "output_hash": digest, "output_signature": sig,
               "parents": {p: _summary(lineages[p]) for p in step.parents},
               "result": result, "started_at": time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(started)),
               "runtime_s": round(time.time() - started, 2), "posttrain_version": version}
    text = json.dumps(lineage, indent=2, default=str) + "\n"
    partial = step.dir / f".{LINEAGE}.partial"
    partial.write_text(text)
    partial.replace(step.dir / LINEAGE)  # written last: only now is the step complete
    pending.unlink(missing_ok=True)
    return json.loads(text)  # the same thing a later, skipping run reads back


def _drop_stale_checkpoints(step: Step, inputs: dict) -> Path:
    """A train step that crashed may resume (`resume: auto`) from its checkpoints when it reruns with the same
    config and inputs; any other checkpoints (a finished run, another config) are removed, never resumed.
    Returns the marker of the attempt, removed when the step completes."""
    pending = step.dir / ".recipe-pending"
    current = _config_hash({"config": step.config, "inputs": inputs})
    if step.kind == "train" and (step.dir / "checkpoints").is_dir():
        previous = pending.read_text().strip() if pending.is_file() else None
        if previous != current:
            log.info("%s: removing checkpoints of an earlier run", step.name)
            shutil.rmtree(step.dir / "checkpoints")
    pending.write_text(current + "\n")
    return pending


def format_results(results: dict) -> str:
    width = max(len(name) for name in results)
    return "\n".join(f"  {name:<{width}}  {r['kind']:<10} {'skipped' if r['skipped'] else 'ran    '}  {r['output']}"
                     for name, r in results.items())
