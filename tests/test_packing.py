"""Packing is exact: a packed forward gives each document the logits it gets alone; batching is sound."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from posttrain.data.batching import batch_indices, collate, collate_packed, pack

ARCHS = ["qwen2", "llama", "gpt2"]
IMPLS = ["sdpa", "eager"]
_models: dict = {}


def load(make_model, arch: str, impl: str):
    if (arch, impl) not in _models:
        model = AutoModelForCausalLM.from_pretrained(make_model(arch), attn_implementation=impl,
                                                     dtype=torch.float32)
        _models[arch, impl] = model.eval()
    return _models[arch, impl]


def doc(n: int, seed: int, prompt: int = 0) -> dict:
    """A feature of n random tokens; the first `prompt` tokens are not trained (like an SFT prompt)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 300, (n,), generator=g).tolist()
    return {"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]}


def shifted_ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    logits, labels = logits[..., :-1, :].reshape(-1, logits.shape[-1]), labels[..., 1:].reshape(-1)
    return F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum"), int((labels != -100).sum())


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_packed_logits_equal_separate(make_model, arch, impl):
    model = load(make_model, arch, impl)
    docs = [doc(7, 1), doc(12, 2), doc(4, 3)]
    batch = collate_packed([docs], pad_id=1, max_length=26, attn_implementation=impl)  # 3 padding tokens
    assert batch["position_ids"][0].tolist() == [*range(7), *range(12), *range(4), 0, 0, 0]
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits[0]
        start = 0
        for d in docs:
            alone = model(input_ids=torch.tensor([d["input_ids"]])).logits[0]
            n = len(d["input_ids"])
            torch.testing.assert_close(packed[start:start + n], alone, atol=1e-5, rtol=1e-4)
            start += n
    assert torch.isfinite(packed).all()


def test_without_mask_documents_leak(make_model):
    """Guards the reason for the explicit mask: position_ids alone do not separate documents."""
    model = load(make_model, "qwen2", "sdpa")
    docs = [doc(7, 1), doc(12, 2)]
    batch = collate_packed([docs], pad_id=1, attn_implementation="sdpa")
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"]).logits[0, 7:]
        alone = model(input_ids=torch.tensor([docs[1]["input_ids"]])).logits[0]
    assert not torch.allclose(packed, alone, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_packed_loss_equals_token_weighted_loss(make_model, arch, impl):
    model = load(make_model, arch, impl)
    docs = [doc(9, 4, prompt=3), doc(5, 5), doc(11, 6, prompt=6), doc(6, 7, prompt=2), doc(3, 8)]
    rows = [[docs[i] for i in row] for row in pack([len(d["input_ids"]) for d in docs], max_length=16)]
    batch = collate_packed(rows, pad_id=1, attn_implementation=impl)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"]).logits
        packed_sum, packed_n = shifted_ce_sum(logits, batch["labels"])
        total, n_tokens = 0.0, 0
        for d in docs:
            s, n = shifted_ce_sum(model(input_ids=torch.tensor([d["input_ids"]])).logits,
                                  torch.tensor([d["labels"]]))
            total, n_tokens = total + s, n_tokens + n
    assert packed_n == n_tokens
    torch.testing.assert_close(packed_sum / packed_n, total / n_tokens, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("arch", ARCHS)
def test_right_padding_keeps_logits(make_model, arch, impl):
    model = load(make_model, arch, impl)
    docs = [doc(10, 1), doc(4, 2), doc(7, 3)]
    batch = collate(docs, pad_id=1)
    assert batch["labels"][1, 4:].eq(-100).all() and batch["attention_mask"][1].tolist() == [1] * 4 + [0] * 6
    with torch.no_grad():
        padded = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for row, d in enumerate(docs):
            alone = model(input_ids=torch.tensor([d["input_ids"]])).logits[0]
            torch.testing.assert_close(padded[row, :len(d["input_ids"])], alone, atol=1e-5, rtol=1e-4)


def test_collate_classification_labels():
    batch = collate([{"input_ids": [5, 6, 7], "label": 1}, {"input_ids": [8], "label": 0}], pad_id=1)
    assert batch["labels"].tolist() == [1, 0] and batch["labels"].dtype == torch.long
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 1, 1]]


def test_eager_mask_is_additive_and_sdpa_mask_is_bool():
    docs = [doc(2, 1), doc(2, 2)]
    sdpa = collate_packed([docs], pad_id=1, max_length=5, attn_implementation="sdpa")["attention_mask"]
    eager = collate_packed([docs], pad_id=1, max_length=5, attn_implementation="eager",
                           dtype=torch.bfloat16)["attention_mask"]
    assert sdpa.dtype == torch.bool and sdpa.shape == (1, 1, 5, 5)
    assert sdpa[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0],
                                         [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    assert eager.dtype == torch.bfloat16
    assert torch.equal(eager == 0, sdpa) and (eager[~sdpa] == torch.finfo(torch.bfloat16).min).all()
    labels = collate_packed([docs], pad_id=1, max_length=5)["labels"][0].tolist()
    assert labels == [-100, docs[0]["labels"][1], -100, docs[1]["labels"][1], -100]


# --------------------------------------------------------------------------- batch order and packing

LENGTHS = [(i * 37) % 200 + 1 for i in range(1000)]


def padded_tokens(batches, lengths):
    return sum(max(lengths[i] for i in b) * len(b) for b in batches)


@pytest.mark.parametrize("group", [True, False])
def test_batch_indices_deterministic_and_complete(group):
    a = batch_indices(LENGTHS, 8, seed=3, epoch=1, group_by_length=group)
    assert a == batch_indices(LENGTHS, 8, seed=3, epoch=1, group_by_length=group)
    assert a != batch_indices(LENGTHS, 8, seed=3, epoch=2, group_by_length=group)
    assert a != batch_indices(LENGTHS, 8, seed=4, epoch=1, group_by_length=group)
    assert sorted(i for b in a for i in b) == list(range(len(LENGTHS)))
    assert all(len(b) <= 8 for b in a)


def test_batch_indices_drop_last():
    batches = batch_indices(list(range(1, 21)), 8, seed=0, epoch=0, group_by_length=True, drop_last=True)
    assert len(batches) == 2 and all(len(b) == 8 for b in batches)
    assert len(batch_indices(list(range(1, 21)), 8, seed=0, epoch=0, group_by_length=False)) == 3


def test_grouping_reduces_padding_and_puts_longest_first():
    grouped = batch_indices(LENGTHS, 8, seed=0, epoch=0, group_by_length=True)
    plain = batch_indices(LENGTHS, 8, seed=0, epoch=0, group_by_length=False)
    assert padded_tokens(grouped, LENGTHS) < 0.8 * padded_tokens(plain, LENGTHS)
    assert max(LENGTHS[i] for i in grouped[0]) == max(LENGTHS)


def test_pack_fits_and_uses_every_index_once():
    rows = pack(LENGTHS, 256)
    assert sorted(i for r in rows for i in r) == list(range(len(LENGTHS)))
    assert all(sum(LENGTHS[i] for i in r) <= 256 for r in rows)
    assert len(rows) <= 1.1 * sum(LENGTHS) / 256 + 1  # close to the lower bound
    assert rows == pack(LENGTHS, 256)
    with pytest.raises(ValueError, match="max_length"):
        pack([3, 300], 256)
