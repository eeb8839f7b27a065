"""Tokenisation and collation for the preference stages: rm and dpo (Preference), kto (Feedback).

The prompt and each response are tokenized separately, so the prompt ids are the same for chosen and
rejected: the basis of prefix sharing, and what lets a response's log-prob sum only its own tokens.

Truncation rule (when prompt + the longer response exceed max_length):
  1. the prompt keeps only its LAST max_prompt_length tokens (default max_length // 2): the end of the
     prompt, next to the answer, matters most (a long prompt loses its start, system prompt included);
  2. each response keeps its FIRST max_length - len(prompt) tokens (it may lose its end-of-turn marker).
Every truncated example is counted in the stats.
"""
from __future__ import annotations

import logging
from collections import Counter
from typing import Iterable

import torch

from ..errors import DataError
from .encode import (IGNORE, EncodeStats, SkippableError, render_chat, assistant_spans, check_chat_template,
                     expand_images, missing_parts)
from .examples import Conversation, Feedback, Message, Preference
from .vision import pixel_batch

log = logging.getLogger("posttrain")


def response_text(tokenizer, prompt: list[Message], prompt_text: str, response: list[Message], source) -> str:
    """The text the template adds for `response` after the generation prompt: the assistant content plus
    the end-of-turn marker, without the whitespace between turns."""
    full = render_chat(tokenizer, prompt + response, None, generation_prompt=False)
    if full.startswith(prompt_text):
        return full[len(prompt_text):].rstrip()
    # Templates that render the prompt differently once an answer follows: locate the assistant turns.
    text, spans = assistant_spans(tokenizer, Conversation(prompt + response, source=source))
    start, end = spans[len([m for m in prompt if m["role"] == "assistant"])][0], spans[-1][1]
    if text[:start] != prompt_text:
        raise SkippableError("the chat template renders the prompt differently when an answer follows",
                             source, "prompt", "prompt not a prefix")
    return text[start:end]


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # the template puts BOS itself


def _encode(tokenizer, prompt: list[Message], responses: list[list[Message]], source: str, max_length: int,
            max_prompt_length: int | None, counts: Counter | None = None, images: list[str] | None = None,
            vision=None) -> tuple[list[int], list[list[int]], bool, object]:
    """(prompt ids, ids of each response, truncated, the prompt's Pictures or None) under the module's truncation
    rule. `counts` (if given) receives the parts of response turns the template leaves out (as
    encode.encode_conversation). The prompt's `images` become image tokens (data/vision.py), which truncation
    must not cut."""
    max_prompt_length = max_length // 2 if max_prompt_length is None else max_prompt_length
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"max_prompt_length must be in [1, max_length), got {max_prompt_length}")
    try:
        prompt_text = render_chat(tokenizer, prompt, None, generation_prompt=True)
        texts = [response_text(tokenizer, prompt, prompt_text, r, source) for r in responses]
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - template errors (raise_exception(...)) are per example
        raise SkippableError(f"the chat template cannot render this example: {exc}", source, "prompt",
                             "chat template error") from None
    for response, text in zip(responses, texts):
        for message in response if counts is not None else []:
            if message["role"] == "assistant":
                counts.update(missing_parts(message, text, text))
    prompt_ids, response_ids = _ids(tokenizer, prompt_text), [_ids(tokenizer, t) for t in texts]
    pictures = None
    if images:
        if vision is None:
            raise DataError("this example has images, which need a vision-language model", source, "images")
        prompt_ids, _, pictures = expand_images(vision, prompt_ids, [False] * len(prompt_ids), images, source)
    truncated = len(prompt_ids) + max(map(len, response_ids)) > max_length
    if truncated:
        if pictures and vision.image_token_id in prompt_ids[:-max_prompt_length]:
            raise SkippableError(f"the prompt's image tokens do not fit in max_prompt_length ({max_prompt_length})",
                                 source, "images", "images beyond max_length")
        prompt_ids = prompt_ids[-max_prompt_length:]
        response_ids = [ids[:max_length - len(prompt_ids)] for ids in response_ids]
    return prompt_ids, response_ids, truncated, pictures


def encode_preference(tokenizer, ex: Preference, max_length: int, max_prompt_length: int | None = None,
                      counts: Counter | None = None, vision=None) -> dict:
    """{"prompt_ids", "chosen_ids", "rejected_ids", "margin", "truncated"} and "images" (the prompt's Pictures)
    when it has some; see the module's truncation rule."""
    prompt_ids, (chosen, rejected), truncated, pictures = _encode(
        tokenizer, ex.prompt, [ex.chosen, ex.rejected], ex.source, max_length, max_prompt_length, counts,
        ex.images, vision)
    feature = {"prompt_ids": prompt_ids, "chosen_ids": chosen, "rejected_ids": rejected, "margin": ex.margin,
               "truncated": truncated}
    if pictures:
        feature["images"] = pictures
    return feature


def encode_feedback(tokenizer, ex: Feedback, max_length: int, max_prompt_length: int | None = None,
                    counts: Counter | None = None) -> dict:
    """{"prompt_ids", "completion_ids", "desirable", "truncated"}; the same truncation rule as pairs."""
    prompt_ids, (completion,), truncated, _ = _encode(tokenizer, ex.prompt, [ex.completion], ex.source,
                                                      max_length, max_prompt_length, counts)
    return {"prompt_ids": prompt_ids, "completion_ids": completion, "desirable": ex.desirable,
            "truncated": truncated}


# --------------------------------------------------------------------------- whole datasets

# preference datasets report like chat datasets; trained tokens are the response tokens
PairStats = EncodeStats


def _encode_all(examples, encode, expected, response_keys, tokenizer, max_length, max_prompt_length,
                skip_invalid, warn, **options) -> tuple[list[dict], PairStats]:
    check_chat_template(tokenizer)  # a config problem, never skipped example by example
    features, stats = [], PairStats()
    for ex in examples:
        if not isinstance(ex, expected):
            raise DataError(f"expected {expected.__name__} examples, got {type(ex).__name__}",
                            getattr(ex, "source", None))
        counts = Counter()
        feature = stats.attempt(lambda: encode(tokenizer, ex, max_length, max_prompt_length, counts, **options),
                                skip_invalid)
        if feature is None:
            continue
        stats.left_out.update(counts)
        stats.examples += 1
        stats.truncated += feature["truncated"]
        stats.lengths += [len(feature["prompt_ids"]) + len(feature[key]) for key in response_keys]
        stats.trained_tokens += sum(len(feature[key]) for key in response_keys)
        features.append(feature)
    for line in stats.warnings() if warn else []:
        log.warning(line)
    return features, stats


def encode_preferences(examples: Iterable[Preference], tokenizer, *, max_length: int,
                       max_prompt_length: int | None = None, skip_invalid: bool = False,
                       warn: bool = True, vision=None) -> tuple[list[dict], PairStats]:
    """Encode pairs for rm/dpo; per-example problems raise, or with skip_invalid are counted by reason. What
    the chat template leaves out of the responses is counted and, with `warn`, logged once. `vision`: the
    prompts' images become image tokens (a vision-language model; data/vision.py)."""
    return _encode_all(examples, encode_preference, Preference, ("chosen_ids", "rejected_ids"), tokenizer,
                       max_length, max_prompt_length, skip_invalid, warn, vision=vision)


def encode_feedbacks(examples: Iterable[Feedback], tokenizer, *, max_length: int,
                     max_prompt_length: int | None = None, skip_invalid: bool = False,
                     warn: bool = True) -> tuple[list[dict], PairStats]:
    """Encode labelled completions for kto, like encode_preferences."""
    return _encode_all(examples, encode_feedback, Feedback, ("completion_ids",), tokenizer, max_length,
                       max_prompt_length, skip_invalid, warn)


# --------------------------------------------------------------------------- collation

def _rows(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """prompt + response rows, right-padded; labels are the token ids on response tokens, -100 elsewhere
    (unshifted, as in encode.py: the loss shifts them)."""
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    input_ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    labels = torch.full((len(prompts), width), IGNORE, dtype=torch.long)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        n, ids = len(prompt) + len(response), torch.tensor(prompt + response, dtype=torch.long)
        input_ids[row, :n], attention_mask[row, :n] = ids, 1
        labels[row, len(prompt):n] = ids[len(prompt):]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _reference(features: list[dict]) -> dict[str, torch.Tensor]:
    """Precomputed reference log-probs ("ref_*" keys), passed through when every feature has them."""
    keys = [k for k in features[0] if k.startswith("ref_") and all(k in f for f in features)]
    return {k: torch.tensor([float(f[k]) for f in features], dtype=torch.float32) for k in keys}


def collate_pairs(features: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """One concatenated batch of 2B rows for a single forward: rows 0..B-1 are prompt + chosen, rows B..2B-1
    prompt + rejected. "margin" [B] (0 where absent) only if some feature has one; "ref_*" [B] passed on."""
    prompts = [f["prompt_ids"] for f in features] * 2
    responses = [f["chosen_ids"] for f in features] + [f["rejected_ids"] for f in features]
    batch = _rows(prompts, responses, pad_id)
    batch.update(pixel_batch([f.get("images") for f in features] * 2, batch["input_ids"]))
    if any(f.get("margin") is not None for f in features):
        batch["margin"] = torch.tensor([f.get("margin") or 0.0 for f in features], dtype=torch.float32)
    return {**batch, **_reference(features)}


def pair_mismatched(features: list[dict]) -> list[dict]:
    """Give every KTO feature a fixed mismatched completion (the next feature's), so that its KL row does
    not depend on how batches are drawn and its reference log-prob can be computed once, up front."""
    for i, feature in enumerate(features):
        feature["kl_completion_ids"] = features[(i + 1) % len(features)]["completion_ids"]
    return features


def collate_feedback(features: list[dict], pad_id: int, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """KTO batch [B, L] plus "desirable" [B] and the KL rows: each prompt with a mismatched completion,
    which KTO uses to estimate the KL term. The mismatched completion is the feature's own
    `kl_completion_ids` when set (a fixed pairing, see `pair_mismatched`), else the NEXT example's in the
    batch (rotated by one); it is cut to max_length when given."""
    prompts = [f["prompt_ids"] for f in features]
    completions = [f["completion_ids"] for f in features]
    batch = _rows(prompts, completions, pad_id)
    batch["desirable"] = torch.tensor([bool(f["desirable"]) for f in features], dtype=torch.bool)
    if all("kl_completion_ids" in f for f in features):
        shifted = [f["kl_completion_ids"] for f in features]
    else:
        shifted = completions[1:] + completions[:1]
    if max_length is not None:
        shifted = [c[:max(0, max_length - len(p))] for p, c in zip(prompts, shifted)]
    kl = _rows(prompts, shifted, pad_id)
    batch.update({f"kl_{key}": value for key, value in kl.items()})
    return {**batch, **_reference(features)}
