"""The exported GGUF run by llama.cpp itself (through llama-cpp-python), when it is installed.

llama-cpp-python is not in the dev extra: it compiles llama.cpp from source at install time, which did not
finish within 40 minutes on this project's 2-core machine under load (CI's budget is 90 minutes in all).
Install it by hand (`pip install llama-cpp-python`) to run these tests; otherwise they are skipped.
"""
from __future__ import annotations

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from test_export_gguf import CHATS, chat_ids, greedy, vivid

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (it builds llama.cpp from "
                                                    "source; not part of the dev extra)")


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_llama_cpp_reads_the_file_and_generates_the_same_tokens(make_model, tmp_path, arch):
    """init-model's own models (GPT-2 with its 3x MLP and 2048 positions, which transformers' reader cannot
    rebuild): llama.cpp tokenizes the chat like the source tokenizer and greedy-decodes the same tokens."""
    from posttrain.export.gguf import write_gguf
    from posttrain.export.hf import load_merged

    source_dir = vivid(make_model(arch), tmp_path / "vivid")
    model, tokenizer = load_merged(str(source_dir))
    path = write_gguf(model, tokenizer, tmp_path / f"{arch}.gguf", "f16")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_threads=2, verbose=False)
    for chat in CHATS:
        ids = chat_ids(tokenizer, chat)
        text = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == ids
        expected = greedy(AutoModelForCausalLM.from_pretrained(source_dir).eval(), ids, n=12)
        llm.reset()
        produced = []
        for token in llm.generate(ids, top_k=1, temp=0.0, reset=True):
            produced.append(token)
            if len(produced) == 12:
                break
        assert produced == expected


def test_llama_cpp_reads_the_chat_template_and_end_of_turn(make_model, tmp_path):
    from posttrain.export.gguf import write_gguf
    from posttrain.export.hf import load_merged

    model, tokenizer = load_merged(str(make_model("qwen2")))
    path = write_gguf(model, tokenizer, tmp_path / "m.gguf", "q8_0")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=128, verbose=False)
    assert llm.metadata["tokenizer.chat_template"] == AutoTokenizer.from_pretrained(make_model("qwen2")).chat_template
    assert int(llm.metadata["tokenizer.ggml.eot_token_id"]) == tokenizer.convert_tokens_to_ids("<|im_end|>")
