"""What a GPU user relies on, checked on the CPU: devices and dtypes resolved with one-line errors, log-probs
computed chunk by chunk (no [tokens, vocab] tensor) with the gradients of the plain computation, models placed
in the dtype asked for, the 8-bit optimizer, gradient checkpointing of a separate critic."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from posttrain import forward, modeling
from posttrain.errors import ConfigError
from posttrain.forward import HeadLogps, token_logps


# ------------------------------------------------------------------------------------------- devices, dtypes

def test_device_and_dtype_resolution():
    assert modeling.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu") or \
        modeling.resolve_device("auto").type == "mps"
    assert modeling.resolve_device("cpu") == torch.device("cpu")
    assert modeling.resolve_dtype("auto", "cpu") == torch.float32
    assert modeling.resolve_dtype("fp32", "cpu") == torch.float32
    assert modeling.resolve_dtype("float32", "cpu") == torch.float32  # the long names are accepted too
    for bad, words in (("gpu", "choose one of auto, cuda, cuda:N, mps, cpu"), ("cuda:x", "choose one of")):
        with pytest.raises(ConfigError, match=words):
            modeling.resolve_device(bad)
    with pytest.raises(ConfigError, match="^--dtype int8: choose one of auto, bf16, fp16, fp32$"):
        modeling.resolve_dtype("int8", "cpu")
    with pytest.raises(ConfigError, match="^--dtype fp16: fp16 is for GPUs"):
        modeling.resolve_dtype("fp16", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU, so --device cuda is valid here")
def test_missing_cuda_is_one_line_naming_the_flag():
    with pytest.raises(ConfigError) as caught:
        modeling.resolve_device("cuda", flag="device:")
    message = str(caught.value)
    assert message.startswith("device: cuda: no CUDA GPU is visible here") and "\n" not in message


def test_bf16_on_a_cpu_without_it_is_refused(monkeypatch):
    """Whether this CPU has native bf16 is read from /proc/cpuinfo; both answers are checked."""
    monkeypatch.setattr(modeling, "fast_bf16", lambda: False)
    with pytest.raises(ConfigError, match="^--dtype bf16: this CPU has no native bf16"):
        modeling.resolve_dtype("bf16", "cpu")
    monkeypatch.setattr(modeling, "fast_bf16", lambda: True)
    assert modeling.resolve_dtype("bf16", "cpu") == torch.bfloat16


# ------------------------------------------------------------------------------------------- chunked log-probs

def plain_logps(hidden, weight, bias, targets, temperature):
    logits = F.linear(hidden, weight, bias).float() / temperature
    return -F.cross_entropy(logits, targets, reduction="none"), logits


@pytest.mark.parametrize("chunk_rows", [3, 1000])  # several chunks (recomputed in the backward) / one chunk (kept)
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_logps_equal_plain_logits_and_gradients(monkeypatch, chunk_rows, with_bias):
    torch.manual_seed(0)
    rows, width, vocab, temperature = 10, 16, 50, 0.7
    monkeypatch.setattr(forward, "CHUNK_ELEMENTS", chunk_rows * vocab)
    hidden = torch.randn(rows, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, vocab, (rows,))
    upstream = torch.randn(rows, dtype=torch.float32)

    logps, entropy = HeadLogps.apply(hidden, weight, bias, targets, temperature, True)
    (logps * upstream).sum().backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    expected, logits = plain_logps(hidden, weight, bias, targets, temperature)
    (expected * upstream).sum().backward()
    theirs = [t.grad for t in (hidden, weight, bias) if t is not None]

    torch.testing.assert_close(logps, expected.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy, forward.entropy_of(logits.detach()).float(), atol=1e-5, rtol=1e-5)  # fp32 vs fp64
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not entropy.requires_grad


def test_head_logps_under_bf16_autocast_match_the_models_own_head(monkeypatch):
    """Under autocast the chunked path multiplies in bf16 like the model's own head would, then works in fp32."""
    torch.manual_seed(0)
    monkeypatch.setattr(forward, "CHUNK_ELEMENTS", 4 * 64)
    head = torch.nn.Linear(32, 64, bias=False)
    hidden = torch.randn(9, 32, requires_grad=True)
    targets = torch.randint(0, 64, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = HeadLogps.apply(hidden, head.weight, None, targets, 1.0, False)
        logits = head(hidden)
    assert logits.dtype == torch.bfloat16
    expected = -F.cross_entropy(logits.float(), targets, reduction="none")
    torch.testing.assert_close(logps, expected, atol=1e-6, rtol=1e-6)
    logps.sum().backward()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


def test_token_logps_of_a_model_never_builds_vocab_sized_rows_for_more_than_a_chunk(tiny_model, monkeypatch):
    """On a real model: the chunked log-probs and their gradients equal the full-logits computation, and the
    largest float tensor the forward and backward allocate is one chunk of logits, not [tokens, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    vocab = model.config.vocab_size
    monkeypatch.setattr(forward, "CHUNK_ELEMENTS", 8 * vocab)
    torch.manual_seed(1)
    input_ids = torch.randint(5, vocab, (3, 20))
    labels = input_ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    trained = int((labels[:, 1:] != -100).sum())

    reference = copy.deepcopy(model)
    logits = reference(input_ids=input_ids).logits[:, :-1].float()
    expected = -F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="none", ignore_index=-100)
    expected = expected[labels[:, 1:].flatten() != -100]
    expected.sum().backward()

    largest = []

    def track(tensor):
        if tensor.is_floating_point() and tensor.dim() == 2 and tensor.shape[-1] == vocab:
            largest.append(tensor.shape[0])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(track, lambda t: t):
        reference(input_ids=input_ids).logits.float().log_softmax(-1).sum()
    assert largest, "the hook sees the full forward's logits"
    largest.clear()
    with torch.autograd.graph.saved_tensors_hooks(track, lambda t: t):
        out = token_logps(model, batch)
    out["logps"].sum().backward()
    assert out["logps"].shape == (trained,) and out["logits"] is None
    torch.testing.assert_close(out["logps"], expected.detach(), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert largest == []  # no [tokens, vocab] logits were kept for the backward (the full forward keeps several)
