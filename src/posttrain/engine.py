"""The one generation engine: continuous batching over a KV cache, used by `generate`, rollouts, eval, chat and serve.

The decoding loop is written out here on top of the model's forward (no `model.generate`), so that what is
sampled and what is recorded are visible in one place. A `Scheduler` holds the running rows (one row = one
prompt's sample) and a queue of waiting ones; each `step()`:

1. decodes one token for every running row: one forward of [rows, 1] through the cache (kv_cache.RowCache:
   buffers with spare room, no per-step `torch.cat`), then sampler.RowSampler picks each row's token with the
   row's own settings (temperature, top-k, top-p, penalties, logit bias, min_tokens) from the row's own random
   stream. Tokens and log-probs come to the host as one small tensor: the only host sync of a step;
2. ends rows: at a stop token (end-of-turn or EOS; kept in `token_ids` and `logprobs`, as RL must learn to stop,
   but not in `text`), at a stop string (`text` cut before it; checked on the newly decoded text only), at the
   row's own `max_new_tokens` ("length"), or when the caller sets `row.finish_reason` (a cancelled request);
3. drops finished rows from the batch (at once when rows join, else once a quarter of the batch has finished)
   and forgets cache columns that only padding uses;
4. admits waiting rows while fewer than `max_rows` run: their prompts are prefilled together (left padded,
   logits of the last position only), their first token sampled, and their cache joined to the running one.

Rows are left padded and right-aligned in the cache; the attention mask hides the padding and position ids
count only real tokens, so a row's result does not depend on its neighbours. Greedy decoding gives the tokens
transformers' `generate` gives (tested).

Why not transformers' own continuous batching (`generate_batch`, `ContinuousBatchingManager`, paged cache, as
of 5.23)? Checked first: it runs on CPU, but it samples every request from one shared generator (no per-request
seed), applies one set of logits processors per batch, has no stop strings and no top log-probs, records
log-probs after the processors (RL needs the policy's own), and on this CPU 8 prompts x 32 tokens of a tiny model
took 21-33 s against 0.08-0.15 s for `model.generate`, with greedy tokens that differed from `generate`'s. The
loop here is ~300 lines over transformers' model forward and Cache API.

Log-probs (`Completion.logprobs`): log softmax(logits / T) at each sampled token, T the row's temperature (1 for
greedy rows), before bias, penalties and top-k / top-p: the policy's distribution at the sampling temperature,
which RL objectives recompute during the update. `top_logprobs` k records the k most likely tokens of that
distribution at each step; `Engine.prompt_logprobs` scores prompt tokens (what `echo` + `logprobs` returns).
"""
from __future__ import annotations

import inspect
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .errors import ConfigError
from .kv_cache import RowCache, supports_rows
from .modeling import end_of_turn_token_ids
from .sampler import RowSampler, row_key
from .vlm import prefill_inputs


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0  # 1: no nucleus filtering
    top_k: int = 0  # 0: no top-k filtering
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # any integer; None: drawn from torch's global generator
    n: int = 1  # samples per prompt
    top_logprobs: int = 0  # also record the k most likely tokens at each step (Completion.top_logprobs)
    presence_penalty: float = 0.0  # subtracted from the logit of every token already generated
    frequency_penalty: float = 0.0  # subtracted once per time a token was generated
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    min_tokens: int = 0  # no stop token or stop string before this many tokens
    ignore_eos: bool = False  # keep going past end-of-turn / EOS tokens (until max_new_tokens or a stop string)

    def __post_init__(self):
        problems = [f"{name} {why}" for name, bad, why in (
            ("max_new_tokens", self.max_new_tokens < 1, "must be at least 1"),
            ("temperature", not self.temperature >= 0, "must be >= 0"),
            ("top_p", not 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", self.top_k < 0, "must be >= 0"),
            ("n", self.n < 1, "must be at least 1"),
            ("top_logprobs", self.top_logprobs < 0, "must be >= 0"),
            ("stop", any(not isinstance(s, str) or not s for s in self.stop), "must be non-empty strings"),
            ("min_tokens", not 0 <= self.min_tokens <= self.max_new_tokens, "must be in [0, max_new_tokens]"),
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


@dataclass(eq=False)
class Row:
    """One sample being decoded. `owner` is the caller's (the server keeps (job, choice) there)."""

    prompt: list[int]
    params: SamplingParams
    key: tuple[int, int]  # the row's random stream (sampler.row_key)
    prompt_index: int = 0
    adapter: str | None = None  # a served LoRA adapter's name, "__base__" for the base, None: the model as it is
    wants_text: bool = False  # keep `shown` up to date every step (streaming); rows with stop strings always do
    owner: object = None
    images: object = None  # the prompt's images (data/vision.Pictures) for a vision-language model
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    shown: str = ""  # text decoded so far (incrementally; an incomplete UTF-8 character is held back)
    text: str | None = None  # set when a stop string cut it (final then)
    finish_reason: str | None = None
    _prefix_offset: int = 0
    _read_offset: int = 0

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


class Engine:
    def __init__(self, model, tokenizer, stop_token_ids: list[int] | None = None, vision=None):
        self.model = model
        self.tokenizer = tokenizer
        self.vision = vision  # a vision-language model's image side (data/vision.Vision), else None
        base = getattr(model, "get_base_model", lambda: model)()
        if stop_token_ids is None:
            configured = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
            configured = configured if isinstance(configured, list) else [configured]
            stop_token_ids = end_of_turn_token_ids(tokenizer) + [i for i in configured if i is not None]
        self.stop_token_ids = list(dict.fromkeys(stop_token_ids))
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.keeps_last_logits = "logits_to_keep" in inspect.signature(base.forward).parameters
        self.rows_can_change = supports_rows(base.config)

    @classmethod
    def load(cls, model_dir, adapter=None, dtype: torch.dtype | str | None = None, chat_template: str | None = None,
             quantize: str | None = None, device: torch.device | str | None = None) -> "Engine":
        """A model directory (or hub id), optionally with a LoRA adapter directory on top of it, placed on `device`
        (None or "auto": a GPU when there is one, else the CPU; modeling.resolve_device) in `dtype` (a torch
        dtype as given; a name or None through modeling.resolve_dtype: "auto" is bf16 on a GPU, fp32 on a CPU);
        `quantize` ("int8") quantises the linear weights after the adapter is attached (see quantize.py)."""
        from pathlib import Path

        from .modeling import check_adapter, load_model, load_tokenizer, resolve_device, resolve_dtype

        device = device if isinstance(device, torch.device) else resolve_device(device)
        dtype = dtype if isinstance(dtype, torch.dtype) else resolve_dtype(dtype, device)
        tokenizer_source = str(model_dir)
        if adapter is not None:
            if not (Path(adapter) / "adapter_config.json").is_file():
                raise ConfigError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
            if (Path(adapter) / "tokenizer_config.json").is_file():
                tokenizer_source = str(adapter)
        tokenizer = load_tokenizer(tokenizer_source, chat_template=chat_template)
        model = load_model(str(model_dir), tokenizer=tokenizer, dtype=dtype, device=device)
        if adapter is not None:
            from peft import PeftModel

            check_adapter(model, adapter, str(model_dir))
            model = PeftModel.from_pretrained(model, str(adapter))
        from .data.vision import load_vision
        from .quantize import quantize_weights

        return cls(quantize_weights(model.to(device).eval(), quantize), tokenizer, vision=load_vision(str(model_dir)))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ---------------------------------------------------------------- public entry points

    def rows(self, prompts: list[list[int]], params: SamplingParams, images: list | None = None,
             **row_fields) -> list[Row]:
        """prompts x n rows; row i = prompt i // n, sample i % n, its random stream keyed by (seed, i). `images`:
        each prompt's Pictures (image_prompt) or None."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("generate: every prompt needs at least one token")
        images = images or [None] * len(prompts)
        return [Row(list(prompt), params, row_key(params.seed, index * params.n + j), prompt_index=index,
                    images=images[index], **row_fields)
                for index, prompt in enumerate(prompts) for j in range(params.n)]

    def generate(self, prompts: list[list[int]], params: SamplingParams, max_rows: int | None = None,
                 images: list | None = None) -> list[Completion]:
        """n completions per token-id prompt, in prompt order (completion i answers prompt i // n). At most
        `max_rows` rows decode at once (None: all); a finished row's place goes to the next waiting one.
        `images`: each prompt's Pictures (image_prompt) or None."""
        rows = self.rows(prompts, params, images)
        scheduler = self.scheduler(max_rows or len(rows))
        scheduler.add(rows)
        with _eval_mode(self.model):
            while scheduler.busy:
                scheduler.step()
        return [self.finish(row) for row in rows]

    def chat(self, conversations: list[list[dict]], params: SamplingParams) -> list[Completion]:
        """Render each conversation with the chat template plus the generation prompt, then generate."""
        return self.generate([self.chat_prompt(messages) for messages in conversations], params)

    def chat_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The conversation rendered as training renders it (data.encode.render_chat: tool-call turns in the form
        the template expects), plus the generation prompt."""
        from .data.encode import render_chat

        if not getattr(self.tokenizer, "chat_template", None):
            raise ConfigError("this tokenizer has no chat template: give prompts as plain strings, or set one "
                              "with --chat-template")
        try:
            text = render_chat(self.tokenizer, messages, tools, generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - Jinja raises many kinds; the message is what matters
            raise ConfigError(f"the chat template could not render these messages: {exc}") from None
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def image_prompt(self, messages: list[dict], images: list[str], tools: list[dict] | None = None):
        """(token ids, Pictures) of a conversation whose messages hold data/vision.IMAGE_SLOT where `images` (data
        URLs or local paths, in order) belong: each image token repeated as the model's processor counts it."""
        from .data.vision import Pictures, count_slots

        if self.vision is None:
            raise ConfigError("this model reads no images (it is not a vision-language model with an image "
                              "processor)")
        if sum(count_slots([m]) for m in messages) != len(images):
            raise ConfigError(f"{len(images)} images for {sum(count_slots([m]) for m in messages)} image places")
        ids = self.chat_prompt(messages, tools)
        try:
            ids, _, used = self.vision.expand(ids, [False] * len(ids), images)
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if used != len(images):
            raise ConfigError(f"the chat template wrote {used} image tokens for {len(images)} images")
        return ids, Pictures(tuple(images), self.vision) if images else None

    def stream(self, prompt: list[int], params: SamplingParams, images=None) -> Iterator[Delta]:
        """Text deltas for one prompt (params.n must be 1); the last Delta carries the Completion.
        Text that may be the start of a stop string, or an incomplete UTF-8 character, is held back."""
        if params.n != 1:
            raise ConfigError("stream: n must be 1")
        row = self.rows([prompt], params, [images], wants_text=True)[0]
        scheduler = self.scheduler(1)
        scheduler.add([row])
        sent = 0
        with _eval_mode(self.model):
            while scheduler.busy:
                scheduler.step()
                if row.finish_reason is None:
                    text = self.visible_text(row)
                    if len(text) > sent:
                        yield Delta(text[sent:])
                        sent = len(text)
        completion = self.finish(row)
        yield Delta(completion.text[sent:], completion)

    def scheduler(self, max_rows: int = 64) -> "Scheduler":
        return Scheduler(self, max_rows)

    def finish(self, row: Row) -> Completion:
        text = row.text
        if text is None:  # a stop token is never part of the text
            text = self._decode_text(row.token_ids[:-1] if row.finish_reason == "stop" else row.token_ids)
        return Completion(row.prompt_index, row.token_ids, text, row.logprobs, row.finish_reason or "length",
                          prompt_tokens=row.prompt_tokens, top_logprobs=row.top_logprobs)

    def visible_text(self, row: Row) -> str:
        """The text of an unfinished row that is safe to show: without a trailing possible start of a stop
        string (an incomplete UTF-8 character is never in `row.shown`)."""
        return row.shown[:len(row.shown) - _held_back(row.shown, row.params.stop)]

    @torch.no_grad()
    def prompt_logprobs(self, prompts: list[list[int]], top_logprobs: int = 0, batch_size: int = 8,
                        adapter: str | None = None) -> list[PromptLogprobs]:
        """Score each prompt's tokens (one forward per `batch_size` prompts, left padded like generation)."""
        results = []
        with _eval_mode(self.model):
            device = self.device
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start:start + batch_size]
                input_ids, attention_mask = self._left_pad(chunk, device)
                position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
                extra = {"adapter_names": [adapter] * len(chunk)} if adapter is not None else {}
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    **extra).logits
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
        return results

    # ---------------------------------------------------------------- used by the scheduler

    def forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str] | None,
                last_only: bool, inputs: dict | None = None) -> torch.Tensor:
        """Logits [rows, vocab] of the last position, the cache updated in place. `inputs`: more model inputs (a
        prefill's pixels, vlm.prefill_inputs)."""
        extra = {"adapter_names": adapters} if adapters is not None else {}
        extra.update(inputs or {})
        if last_only and self.keeps_last_logits:
            extra["logits_to_keep"] = 1
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, **extra)
        return out.logits[:, -1, :]

    def _left_pad(self, sequences: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for index, sequence in enumerate(sequences):
            input_ids[index, width - len(sequence):] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[index, width - len(sequence):] = 1
        return input_ids.to(device), attention_mask.to(device)

    def append(self, row: Row, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        """Record a sampled token and end the row when it should end."""
        row.token_ids.append(token)
        row.logprobs.append(logprob)
        if top is not None:
            row.top_logprobs.append(top)
        params, count = row.params, len(row.token_ids)
        if token in self.stop_token_ids and not params.ignore_eos:
            row.finish_reason = "stop"
            return
        if params.stop or row.wants_text:
            before = len(row.shown)
            self._advance_text(row)
            if params.stop and count >= params.min_tokens and len(row.shown) > before:
                cut = _first_stop(row.shown, params.stop, max(0, before - max(map(len, params.stop)) + 1))
                if cut is not None:
                    row.text, row.finish_reason = row.shown[:cut], "stop"
                    return
        if count >= params.max_new_tokens:
            row.finish_reason = "length"

    def _advance_text(self, row: Row) -> None:
        """Decode only the new tokens, with a few tokens before them as context (so that a tokenizer that drops
        a leading space at the start of a decode still gives the right delta); hold back a trailing
        replacement character: an incomplete UTF-8 sequence that later tokens complete."""
        ids = row.token_ids
        prefix = self._decode_text(ids[row._prefix_offset:row._read_offset])
        full = self._decode_text(ids[row._prefix_offset:])
        if len(full) > len(prefix) and not full.endswith("\ufffd"):
            row.shown += full[len(prefix):]
            row._prefix_offset, row._read_offset = row._read_offset, len(ids)

    def _decode_text(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


class Scheduler:
    """Continuous batching: rows join at step boundaries, finished rows leave (see the module docstring)."""

    def __init__(self, engine: Engine, max_rows: int = 64):
        if max_rows < 1:
            raise ConfigError("max_rows must be at least 1")
        self.engine = engine
        self.max_rows = max_rows
        self.waiting: deque[Row] = deque()
        self.running: list[Row] = []
        self.cache = self.mask = self.positions = self.next_tokens = self.sampler = None
        self.vocab_size = 0
        self.stats = {"steps": 0, "tokens": 0, "prefills": 0, "largest_batch": 0}

    def add(self, rows: Iterable[Row]) -> None:
        self.waiting.extend(rows)

    @property
    def busy(self) -> bool:
        return bool(self.waiting) or any(row.finish_reason is None for row in self.running)

    @property
    def active(self) -> int:
        return sum(row.finish_reason is None for row in self.running)

    @torch.no_grad()
    def step(self) -> list[Row]:
        """Decode one token for every running row, then drop finished rows and admit waiting ones (whose first
        token comes from their prefill). Returns the rows that got a token."""
        advanced = self._decode() if self.active else []
        finished = [i for i, row in enumerate(self.running) if row.finish_reason is not None]
        admit = self._take_waiting()
        if not self.engine.rows_can_change and finished and len(finished) == len(self.running):
            self._reset()  # a model whose cache cannot drop rows: a new batch once all have finished
        elif not self.engine.rows_can_change:
            self.waiting.extendleft(reversed(admit))
            admit = []
        elif finished and (admit or 4 * len(finished) >= len(self.running)):
            self._keep([i for i, row in enumerate(self.running) if row.finish_reason is None])
        if admit:
            advanced += self._prefill(admit)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(self.running))
        return advanced

    # ------------------------------------------------------------------ steps

    def _decode(self) -> list[Row]:
        engine, rows = self.engine, self.running
        live = [row for row in rows if row.finish_reason is None]
        mask = torch.cat([self.mask, self.mask.new_ones(len(rows), 1)], dim=-1)
        logits = engine.forward(self.next_tokens[:, None], mask, self.positions[:, None], self.cache,
                                self._adapters(rows), last_only=False)
        self.mask, self.positions = mask, self.positions + 1
        self.next_tokens = self._sample(logits, self.sampler, rows)
        self.stats["steps"] += 1
        return live

    def _prefill(self, rows: list[Row]) -> list[Row]:
        engine = self.engine
        device = engine.device
        input_ids, mask = engine._left_pad([row.prompt + row.token_ids for row in rows], device)
        positions = next_positions = (mask.cumsum(-1) - 1).clamp(min=0)
        inputs = None
        if any(row.images for row in rows):  # pixels, and Qwen2-VL's 3-D positions (decoding goes on from them)
            inputs, positions, next_positions = prefill_inputs(engine.model, input_ids, mask, positions,
                                                               [row.images for row in rows])
        cache = RowCache() if engine.rows_can_change else DynamicCache(config=getattr(engine.model, "config", None))
        logits = engine.forward(input_ids, mask, positions, cache, self._adapters(rows), last_only=True, inputs=inputs)
        self.vocab_size = logits.shape[-1]
        sampler = RowSampler.build(rows, self.vocab_size, engine.stop_token_ids, device)
        tokens = self._sample(logits, sampler, rows)
        self.stats["prefills"] += 1
        if not self.running:
            self.cache, self.mask, self.positions, self.next_tokens = cache, mask, next_positions[:, -1] + 1, tokens
            self.running = list(rows)
            self.sampler = sampler
        else:
            width = max(self.cache.width(), cache.width())
            self.cache.join(cache, width)
            self.mask = torch.cat([_pad_left(self.mask, width), _pad_left(mask, width)])
            self.positions = torch.cat([self.positions, next_positions[:, -1] + 1])
            self.next_tokens = torch.cat([self.next_tokens, tokens])
            self.running += rows
            self.sampler = RowSampler.build(self.running, self.vocab_size, engine.stop_token_ids, device)
        return list(rows)

    def _sample(self, logits: torch.Tensor, sampler: RowSampler, rows: list[Row]) -> torch.Tensor:
        """Sample, bring tokens and log-probs to the host as one tensor, append them to the unfinished rows."""
        tokens, logprobs, top_ids, top_values = sampler.sample(logits)
        sampler.advance(tokens)
        parts = [tokens.double()[:, None], logprobs.double()[:, None]]
        if top_ids is not None:
            parts += [top_ids.double(), top_values.double()]
        host = torch.cat(parts, dim=-1).tolist()
        k = top_ids.shape[-1] if top_ids is not None else 0
        for row, values in zip(rows, host):
            if row.finish_reason is None:
                want = row.params.top_logprobs
                top = [(int(i), v) for i, v in zip(values[2:2 + want], values[2 + k:2 + k + want])] if want else None
                self.engine.append(row, int(values[0]), values[1], top)
                self.stats["tokens"] += 1
        return tokens

    def _take_waiting(self) -> list[Row]:
        room = self.max_rows - self.active
        admit = []
        while self.waiting and len(admit) < room:
            row = self.waiting.popleft()
            if row.finish_reason is None:  # a request cancelled while waiting is never decoded
                admit.append(row)
        return admit

    def _keep(self, keep: list[int]) -> None:
        """Drop the other rows, then the leading columns that are padding in every row kept."""
        if not keep:
            self._reset()
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.running = [self.running[i] for i in keep]
        self.cache.select(index)
        self.mask, self.positions = self.mask[index], self.positions[index]
        self.next_tokens = self.next_tokens[index]
        longest = max(row.prompt_tokens + len(row.token_ids) - 1 for row in self.running)  # tokens in the cache
        unused = self.mask.shape[1] - longest
        if unused > 0:
            self.cache.trim(unused)
            self.mask = self.mask[:, unused:]
        self.sampler = RowSampler.build(self.running, self.vocab_size, self.engine.stop_token_ids, self.mask.device)

    def _reset(self) -> None:
        self.running = []
        self.cache = self.mask = self.positions = self.next_tokens = self.sampler = None

    @staticmethod
    def _adapters(rows: list[Row]) -> list[str] | None:
        if all(row.adapter is None for row in rows):
            return None
        return [row.adapter or "__base__" for row in rows]


def _pad_left(mask: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(mask, (width - mask.shape[1], 0))


class _eval_mode:
    """Generation runs in eval mode (no dropout); the model's mode is restored afterwards."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.was_training = self.model.training
        self.model.eval()

    def __exit__(self, *exc):
        self.model.train(self.was_training)


def _first_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the earliest stop string starts in text[start:] (an index into text), or None."""
    found = [i for i in (text.find(s, start) for s in stops) if i >= 0]
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
