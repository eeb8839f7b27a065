"""Sampling one token per row, each row with its own settings and its own random stream, in one batched call.

For row i with logits z (the model's, float32):

1. processed logits y = z + logit_bias - frequency_penalty * c - presence_penalty * [c > 0], with c the counts
   of the row's generated tokens (OpenAI's definition); stop tokens are -inf while fewer than `min_tokens`
   tokens have been generated;
2. greedy rows (temperature 0) take argmax y;
3. other rows sample from softmax((y - max y) / T) after top-k (keep the k largest) and then top-p (keep the
   smallest set of most likely tokens whose probability reaches p, the most likely always kept). Subtracting
   max y first keeps a tiny T finite: the maximum becomes 0, the rest -inf (T is at least float32's smallest
   normal number, 1.2e-38: below that it would round to 0);
4. the draw is an inverse CDF: one uniform u per row, token = the first whose cumulative weight exceeds
   u x total weight. It draws from the same distribution as `torch.multinomial` at a fraction of the cost over
   a large vocabulary (no exponential variate per vocabulary entry);
5. u is a counter-based hash of (the row's key, the number of tokens the row has generated): the same key gives
   the same stream whatever else is in the batch, so a seeded request gives the same answer under any load
   (up to floating-point differences of batched matmuls, which move u across a boundary only in near-ties);
6. the recorded log-prob is log softmax(z / T) at the token (T = 1 for greedy rows): the model's own
   distribution at the sampling temperature, before bias, penalties and truncation, i.e. what an RL update
   recomputes. With `top_logprobs` k the k largest entries of that distribution are recorded too.

Which rows need which step is known on the host when the batch is built (`RowSampler.build`), so a step makes
no host round trip of its own.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

MASK32 = 0xFFFFFFFF
TINY = torch.finfo(torch.float32).tiny  # a smaller temperature would be 0 in float32: (z - max z) / T stays finite


def row_key(seed: int | None, index: int) -> tuple[int, int]:
    """Two 32-bit words keying a row's random stream: from (seed, index) when seeded (any integer, however large
    or negative), else from torch's global generator (so torch.manual_seed still makes runs repeatable)."""
    if seed is None:
        return tuple(int(v) for v in torch.randint(0, MASK32 + 1, (2,), dtype=torch.int64))
    digest = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2^32 for 32-bit values held in int64, without overflowing int64."""
    low, high = x & 0xFFFF, x >> 16
    return (low * c + (((high * c) & 0xFFFF) << 16)) & MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser: a bijection with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def uniforms(key_a: torch.Tensor, key_b: torch.Tensor, counter: torch.Tensor) -> torch.Tensor:
    """One float32 in [0, 1) per row from (key, counter), 24 random bits like torch.rand."""
    bits = _mix32(_mix32(key_a ^ _mix32(counter & MASK32)) ^ key_b)
    return (bits >> 8).to(torch.float32) * (1.0 / (1 << 24))


def inverse_cdf(weights: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first entry whose cumulative weight exceeds u x total (weights >= 0, each row's total > 0),
    and the totals. `weights` is overwritten by its cumulative sum."""
    cdf = torch.cumsum(weights, dim=-1, out=weights)
    total = cdf[:, -1]
    picked = torch.searchsorted(cdf, (u * total).unsqueeze(-1), right=True).squeeze(-1)
    return picked.clamp_(max=weights.shape[-1] - 1), total.clone()


@dataclass
class RowSampler:
    """Per-row sampling settings as tensors on the model's device, for one composition of the batch."""

    temperature: torch.Tensor  # [B] float, 1 for greedy rows (their log-probs are taken at T = 1)
    unit_temperature: bool  # every row at T = 1 (no division needed)
    greedy_all: bool
    all_plain: bool  # every row sampled without truncation
    plain: torch.Tensor | None  # rows sampled without truncation
    truncated: torch.Tensor | None  # rows with top-k and/or top-p
    top_k: torch.Tensor | None  # [len(truncated)] k, or the vocabulary size for none
    top_p: torch.Tensor | None  # [len(truncated)]
    top_k_only: int  # > 0: every truncated row has top-k; the largest k (a partial sort suffices)
    key_a: torch.Tensor
    key_b: torch.Tensor
    generated: torch.Tensor  # [B] tokens generated so far (the counter of the random stream)
    bias: torch.Tensor | None  # [B, V] logit bias
    counts: torch.Tensor | None  # [B, V] generated-token counts, with the two penalties
    frequency: torch.Tensor | None
    presence: torch.Tensor | None
    min_tokens: torch.Tensor | None  # [B]
    stop_ids: torch.Tensor
    top_logprobs: int  # the largest k asked for (0: none)
    workspace: torch.Tensor | None = None  # [B, V] reused for the draw's weights

    @classmethod
    def build(cls, rows: list, vocab_size: int, stop_ids: list[int], device) -> "RowSampler":
        """rows: objects with `params` (SamplingParams), `key` (two words) and `token_ids` (generated so far)."""
        params = [row.params for row in rows]
        greedy = [p.temperature == 0 for p in params]
        sampled = [i for i, g in enumerate(greedy) if not g]
        truncated = [i for i in sampled if 0 < params[i].top_k < vocab_size or params[i].top_p < 1]
        truncated_set = set(truncated)
        plain = [i for i in sampled if i not in truncated_set]

        def tensor(values, dtype=torch.float32):
            return torch.tensor(values, dtype=dtype, device=device)

        def indices(values):
            return tensor(values, torch.long) if values else None

        ks = [params[i].top_k if 0 < params[i].top_k < vocab_size else vocab_size for i in truncated]
        top_k_only = max(ks) if truncated and all(k < vocab_size for k in ks) else 0
        penalised = any(p.frequency_penalty or p.presence_penalty for p in params)
        counts = frequency = presence = None
        if penalised:
            counts = torch.zeros(len(rows), vocab_size, device=device)
            for index, row in enumerate(rows):
                if row.token_ids:
                    ids = tensor(row.token_ids, torch.long)
                    counts[index].index_add_(0, ids, torch.ones(len(ids), device=device))
            frequency = tensor([p.frequency_penalty for p in params])
            presence = tensor([p.presence_penalty for p in params])
        bias = None
        if any(p.logit_bias for p in params):
            bias = torch.zeros(len(rows), vocab_size, device=device)
            for index, p in enumerate(params):
                for token, value in p.logit_bias.items():
                    bias[index, token] = value
        min_tokens = tensor([p.min_tokens for p in params], torch.long) if any(p.min_tokens for p in params) else None
        return cls(
            temperature=tensor([max(p.temperature, TINY) if p.temperature else 1.0 for p in params]),
            unit_temperature=all((p.temperature or 1.0) == 1.0 for p in params), greedy_all=not sampled,
            all_plain=len(plain) == len(rows),
            plain=indices(plain), truncated=indices(truncated),
            top_k=tensor(ks, torch.long) if truncated else None,
            top_p=tensor([params[i].top_p for i in truncated]) if truncated else None, top_k_only=top_k_only,
            key_a=tensor([row.key[0] for row in rows], torch.long), key_b=tensor([row.key[1] for row in rows], torch.long),
            generated=tensor([len(row.token_ids) for row in rows], torch.long), bias=bias, counts=counts,
            frequency=frequency, presence=presence, min_tokens=min_tokens,
            stop_ids=tensor(stop_ids, torch.long), top_logprobs=max(p.top_logprobs for p in params))

    def sample(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None,
                                                     torch.Tensor | None]:
        """tokens [B], their log-probs [B], and with top_logprobs k: ids [B, k] and log-probs [B, k]. `logits`
        (float32) may be overwritten. Written to make few passes over [B, vocab] and to allocate little: the
        common case (every row sampled without truncation or processing) is max, subtract (and divide) in place,
        exp into a reused buffer, cumsum in place; the log-partition comes from the cumsum."""
        raw = logits.float()
        processed = self._process(raw)
        top = processed.amax(dim=-1, keepdim=True)
        scaled = processed.sub_(top)  # in place: processed is raw itself or a new tensor (raw kept for log-probs)
        if not self.unit_temperature:
            scaled.div_(self.temperature[:, None])
        log_z = None  # log sum exp(scaled), when the draw computed it on the way
        if self.greedy_all:
            tokens = processed.argmax(dim=-1)
        else:
            u = uniforms(self.key_a, self.key_b, self.generated)
            if self.all_plain:
                if self.workspace is None or self.workspace.shape != scaled.shape:
                    self.workspace = torch.empty_like(scaled)
                tokens, total = inverse_cdf(torch.exp(scaled, out=self.workspace), u)
                log_z = total.log()
            else:
                tokens = processed.argmax(dim=-1)  # greedy rows keep it
                if self.plain is not None:
                    tokens[self.plain] = inverse_cdf(scaled.index_select(0, self.plain).exp(),
                                                     u.index_select(0, self.plain))[0]
                if self.truncated is not None:
                    tokens[self.truncated] = self._truncated(scaled.index_select(0, self.truncated),
                                                              u.index_select(0, self.truncated))
        if processed is not raw:  # log-probs are the model's own distribution: before bias and penalties
            scaled = raw - raw.amax(dim=-1, keepdim=True)
            if not self.unit_temperature:
                scaled.div_(self.temperature[:, None])
            log_z = None
        if log_z is None:
            log_z = scaled.logsumexp(dim=-1)
        logprobs = scaled.gather(-1, tokens[:, None]).squeeze(-1) - log_z
        top_ids = top_values = None
        if self.top_logprobs:
            top_values, top_ids = scaled.topk(min(self.top_logprobs, raw.shape[-1]), dim=-1)
            top_values = top_values - log_z[:, None]
        return tokens, logprobs, top_ids, top_values

    def _process(self, raw: torch.Tensor) -> torch.Tensor:
        processed = raw
        if self.bias is not None:
            processed = processed + self.bias
        if self.counts is not None:
            processed = (processed - self.frequency[:, None] * self.counts
                         - self.presence[:, None] * (self.counts > 0).float())
        if self.min_tokens is not None and self.stop_ids.numel():
            early = (self.generated < self.min_tokens)[:, None]
            stops = processed[:, self.stop_ids]
            processed = processed.index_copy(1, self.stop_ids, stops.masked_fill(early, float("-inf")))
        return processed

    def _truncated(self, scaled: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Top-k then top-p in sorted order (a partial sort when every row has a top-k), then the draw."""
        if self.top_k_only:
            values, order = scaled.topk(min(self.top_k_only, scaled.shape[-1]), dim=-1)
        else:
            values, order = scaled.sort(dim=-1, descending=True)
        rank = torch.arange(values.shape[-1], device=values.device)[None, :]
        values = values.masked_fill(rank >= self.top_k[:, None], float("-inf"))
        probs = values.softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # the mass ranked above each token
        values = values.masked_fill((before >= self.top_p[:, None]) & (rank > 0), float("-inf"))
        picked = inverse_cdf(values.exp(), u)[0]
        return order.gather(-1, picked[:, None]).squeeze(-1)

    def advance(self, tokens: torch.Tensor) -> None:
        """After a step: one more token generated per row (counts for the penalties)."""
        self.generated += 1
        if self.counts is not None:
            self.counts.scatter_add_(1, tokens[:, None], torch.ones_like(tokens[:, None], dtype=self.counts.dtype))
