"""The one generation engine: batched sampling with a KV cache, used by `generate`, rollouts, chat and serve.

The decoding loop is written out here on top of the model's forward (no `model.generate`), so that what is
sampled and what is recorded are visible in one place:

* prompts are token ids, left padded into one batch of prompts x n rows; the attention mask hides the padding
  and position ids count only real tokens, so a row's result does not depend on its neighbours' lengths;
* each step feeds one token per row through a transformers DynamicCache (`past_key_values`, `use_cache`);
* sampling: logits / temperature, then top-k, then top-p (nucleus) filtering, then `torch.multinomial` with a
  `torch.Generator` seeded from `seed`; temperature 0 is greedy (argmax);
* `logprobs[i]` is log pi(token_i) under log_softmax(logits / temperature), *before* top-k / top-p
  filtering: the policy's own distribution at the sampling temperature, which is what RL objectives
  recompute during the update (with temperature 0 the logits are not scaled, i.e. T = 1);
* a row stops at a stop token id (end-of-turn or EOS): the token is kept in `token_ids` and `logprobs` (RL
  must learn to stop) but not in `text`; or when its text contains a stop string: `text` is cut before the
  string, `token_ids` / `logprobs` keep every token sampled up to the one that completed it. Both give
  finish_reason "stop"; running out of `max_new_tokens` gives "length". The batch ends when every row has.

`Engine.stream` yields text deltas for one prompt and never emits text that could still turn out to be the
start of a stop string (it is held back until it is clear), which is what a server needs for SSE.

For the server (`posttrain.serve`): `Engine.decode` is the decoding loop itself, yielding the rows after every
step so that a caller can stream several rows at once (`visible_text`) and end a row early by setting its
`finish_reason` (a cancelled request, or a row with a smaller token budget than its batch);
`SamplingParams.top_logprobs` records the k most likely tokens at every step; `Engine.prompt_logprobs` scores
the prompt tokens themselves (what `echo` with `logprobs` returns and lm-evaluation-harness sums).
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .errors import ConfigError
from .modeling import end_of_turn_token_ids


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: no nucleus filtering
    top_k: int = 0  # 0: no top-k filtering
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # None: torch's global generator
    n: int = 1  # samples per prompt
    top_logprobs: int = 0  # also record the k most likely tokens at each step (Completion.top_logprobs)

    def __post_init__(self):
        problems = [f"{name} {why}" for name, bad, why in (
            ("max_new_tokens", self.max_new_tokens < 1, "must be at least 1"),
            ("temperature", not self.temperature >= 0, "must be >= 0"),
            ("top_p", not 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k < 0, "must be >= 0"),
            ("n", self.n < 1, "must be at least 1"),
            ("top_logprobs", self.top_logprobs < 0, "must be >= 0"),
            ("stop", any(not isinstance(s, str) or not s for s in self.stop), "must be non-empty strings"),
        ) if bad]
        if problems:
            raise ConfigError("sampling: " + "; ".join(problems))


@dataclass
class Completion:
    prompt_index: int  # which of the prompts this answers (each prompt has n completions, in order)
    token_ids: list[int]  # sampled tokens, including a final stop token
    text: str  # decoded with skip_special_tokens, cut before a stop string
    logprobs: list[float]  # one per token id: log pi under logits / temperature, before top-k / top-p
    finish_reason: str  # "stop" (stop token or stop string) | "length"
    prompt_tokens: int = 0  # usage counts for the server
    # with params.top_logprobs = k: per token, the k most likely (token id, log-prob), same distribution as logprobs
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class PromptLogprobs:
    """Log-probs of a prompt's own tokens under the model (temperature 1): entry i scores token i given tokens
    before it, so the first entry is None; `top` holds the k most likely (token id, log-prob) there."""

    token_ids: list[int]
    logprobs: list[float | None]
    top: list[list[tuple[int, float]] | None]


@dataclass
class Delta:
    """One piece of a stream: new text, and on the last piece the finished Completion."""

    text: str
    completion: Completion | None = None


@dataclass
class _Row:
    prompt_index: int
    prompt_tokens: int
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    text: str | None = None  # set when a stop string cut it (final then)
    finish_reason: str | None = None


class Engine:
    def __init__(self, model, tokenizer, stop_token_ids: list[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        if stop_token_ids is None:
            base = getattr(model, "get_base_model", lambda: model)()
            configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
            configured = configured if isinstance(configured, list) else [configured]
            stop_token_ids = end_of_turn_token_ids(tokenizer) + [i for i in configured if i is not None]
        self.stop_token_ids = list(dict.fromkeys(stop_token_ids))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    @classmethod
    def load(cls, model_dir, adapter=None, dtype=torch.float32, chat_template: str | None = None,
             quantize: str | None = None) -> "Engine":
        """A model directory (or hub id), optionally with a LoRA adapter directory on top of it; `quantize`
        ("int8") quantises the linear weights after the adapter is attached (see quantize.py)."""
        from pathlib import Path

        from .modeling import check_adapter, load_model, load_tokenizer

        tokenizer_source = str(model_dir)
        if adapter is not None:
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise ConfigError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
            if (Path(adapter) / "tokenizer_config.json").is_file():
                tokenizer_source = str(adapter)
        tokenizer = load_tokenizer(tokenizer_source, chat_template=chat_template)
        model = load_model(str(model_dir), tokenizer=tokenizer, dtype=dtype)
        if adapter is not None:
            from peft import PeftModel

            check_adapter(model, adapter, str(model_dir))
            model = PeftModel.from_pretrained(model, str(adapter))
        from .quantize import quantize_weights

        return cls(quantize_weights(model.eval(), quantize), tokenizer)

    # ---------------------------------------------------------------- public entry points

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """n completions per token-id prompt, in prompt order (completion i answers prompt i // n)."""
        rows: list[_Row] = []
        for rows in self._decode(prompts, params):
            pass
        return [self._completion(row) for row in rows]

    def chat(self, conversations: list[list[dict]], params: SamplingParams) -> list[Completion]:
        """Render each conversation with the chat template plus the generation prompt, then generate."""
        return self.generate([self.chat_prompt(messages) for messages in conversations], params)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("this tokenizer has no chat template: give prompts as plain strings, or set one "
                              "with --chat-template")
        try:
            text = self.tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True,
                                                      tokenize=False)
        except Exception as exc:  # noqa: BLE001 - Jinja raises many kinds; the message is what matters
            raise ConfigError(f"the chat template could not render these messages: {exc}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def stream(self, prompt: list[int], params: SamplingParams) -> Iterator[Delta]:
        """Text deltas for one prompt (params.n must be 1); the last Delta carries the Completion.
        Text that may be the start of a stop string, or an incomplete UTF-8 character, is held back."""
        if params.n != 1:
            raise ConfigError("stream: n must be 1")
        sent = 0
        row = None
        for rows in self._decode([prompt], params):
            row = rows[0]
            if row.finish_reason is not None:
                continue  # the loop ends here: the decoder stops once every row has finished
            text = self.visible_text(row, params.stop)
            if len(text) > sent:
                yield Delta(text[sent:])
                sent = len(text)
        completion = self._completion(row)
        yield Delta(completion.text[sent:], completion)

    def decode(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[_Row]]:
        """The decoding loop, step by step: yields all rows (prompts x n, updated in place) after each step.
        A caller may set `row.finish_reason` on an unfinished row to end it early; the loop ends when every
        row has finished. `finish(row)` turns a row into its Completion."""
        return self._decode(prompts, params)

    def finish(self, row: _Row) -> Completion:
        return self._completion(row)

    def visible_text(self, row: _Row, stop: list[str]) -> str:
        """The text of an unfinished row that is safe to show: without a trailing possible start of a stop
        string or an incomplete UTF-8 character."""
        text = self._decode_text(row.token_ids)
        return text[:len(text) - _held_back(text, stop)]

    @torch.no_grad()
    def prompt_logprobs(self, prompts: list[list[int]], top_logprobs: int = 0,
                        batch_size: int = 8) -> list[PromptLogprobs]:
        """Score each prompt's tokens (one forward per `batch_size` prompts, left padded like generation)."""
        model = self.model
        was_training = model.training
        model.eval()
        results = []
        try:
            device = next(model.parameters()).device
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                input_ids, attention_mask = self._left_pad(chunk, device)
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                logits = model(input_ids=input_ids, attention_mask=attention_mask,
                               position_ids=position_ids).logits
                width = input_ids.shape[1]
                for index, prompt in enumerate(chunk):
                    # positions width-len .. width-2 predict the prompt's tokens 1 .. len-1
                    rows = logits[index, width - len(prompt):width - 1].float().log_softmax(dim=-1)
                    targets = torch.tensor(prompt[1:], device=device, dtype=torch.long)
                    scored = rows.gather(-1, targets[:, None]).squeeze(-1).tolist()
                    top = [None] * len(prompt)
                    if top_logprobs > 0:
                        values, ids = rows.topk(min(top_logprobs, rows.shape[-1]), dim=-1)
                        top = [None] + [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
                    results.append(PromptLogprobs(list(prompt), [None] + scored, top))
        finally:
            model.train(was_training)
        return results

    # ---------------------------------------------------------------- the decoding loop

    @torch.no_grad()
    def _decode(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[_Row]]:
        """Yield the rows (prompts x n, updated in place) after every step; finished rows have finish_reason."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("generate: every prompt needs at least one token")
        model = self.model
        was_training = model.training
        model.eval()
        try:
            device = next(model.parameters()).device
            rows = [_Row(i, len(p)) for i, p in enumerate(prompts) for _ in range(params.n)]
            input_ids, attention_mask = self._left_pad([prompts[row.prompt_index] for row in rows], device)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
            generator = None
            if params.seed is not None:
                generator = torch.Generator(device=device).manual_seed(params.seed)
            stop_ids = torch.tensor(self.stop_token_ids, device=device, dtype=torch.long)
            cache = DynamicCache(config=getattr(model, "config", None))
            for _ in range(params.max_new_tokens):
                logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               past_key_values=cache, use_cache=True).logits[:, -1, :].float()
                tokens, logprobs = sample(logits, params, generator)
                is_stop = torch.isin(tokens, stop_ids).tolist()
                top = _top_logprobs(logits, params) if params.top_logprobs else None
                for index, row in enumerate(rows):
                    if row.finish_reason is None:
                        if top is not None:
                            row.top_logprobs.append(top[index])
                        self._append(row, tokens[index].item(), logprobs[index].item(), is_stop[index], params)
                yield rows
                if all(row.finish_reason is not None for row in rows):
                    return
                # finished rows keep decoding pad tokens (ignored) so the batch stays rectangular
                done = torch.tensor([row.finish_reason is not None for row in rows], device=device)
                input_ids = tokens.masked_fill(done, self.pad_token_id).unsqueeze(-1)
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(len(rows), 1)], dim=-1)
                position_ids = position_ids[:, -1:] + 1
            for row in rows:
                if row.finish_reason is None:
                    row.finish_reason = "length"
            yield rows
        finally:
            model.train(was_training)

    def _left_pad(self, sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for index, sequence in enumerate(sequences):
            input_ids[index, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[index, width - len(sequence):] = 1
        return input_ids.to(device), attention_mask.to(device)

    def _append(self, row: _Row, token: int, logprob: float, is_stop: bool, params: SamplingParams) -> None:
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        if is_stop:
            row.finish_reason = "stop"
        elif params.stop:
            text = self._decode_text(row.token_ids)
            cut = _first_stop(text, params.stop)
            if cut is not None:
                row.text, row.finish_reason = text[:cut], "stop"

    def _decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)

    def _completion(self, row: _Row) -> Completion:
        text = row.text
        if text is None:  # a stop token is never part of the text
            text = self._decode_text(row.token_ids[:-1] if row.finish_reason == "stop" else row.token_ids)
        return Completion(row.prompt_index, row.token_ids, text, row.logprobs, row.finish_reason or "length",
                          prompt_tokens=row.prompt_tokens, top_logprobs=row.top_logprobs)


def sample(logits: torch.Tensor, params: SamplingParams,
           generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row and its log-prob under log_softmax(logits / T) (before top-k / top-p filtering)."""
    if params.temperature == 0:
        tokens = logits.argmax(dim=-1)
        return tokens, torch.log_softmax(logits, dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    scaled = logits / params.temperature
    logprobs = torch.log_softmax(scaled, dim=-1)
    filtered = top_p_filter(top_k_filter(scaled, params.top_k), params.top_p)
    tokens = torch.multinomial(torch.softmax(filtered, dim=-1), 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def _top_logprobs(logits: torch.Tensor, params: SamplingParams) -> list[list[tuple[int, float]]]:
    """The k most likely tokens per row under the distribution `sample` records logprobs with."""
    logprobs = torch.log_softmax(logits / (params.temperature or 1.0), dim=-1)
    values, ids = logprobs.topk(min(params.top_logprobs, logprobs.shape[-1]), dim=-1)
    return [list(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits per row (k = 0: all)."""
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    threshold = logits.topk(k, dim=-1).values[:, -1:]
    return logits.masked_fill(logits < threshold, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches p (always at least one)."""
    if p >= 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # the mass of the tokens ranked above each one
    remove_sorted = before >= p
    remove = remove_sorted.scatter(-1, order, remove_sorted)
    return logits.masked_fill(remove, float("-inf"))


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in text, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _held_back(text: str, stops: list[str]) -> int:
    """How many trailing characters a stream must not send yet: the longest suffix that is a proper prefix
    of a stop string, or a trailing replacement character (a UTF-8 sequence that is still incomplete)."""
    held = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), held, -1):
            if text.endswith(stop[:length]):
                held = length
                break
    if text.endswith("\ufffd"):
        held = max(held, 1)
    return held
