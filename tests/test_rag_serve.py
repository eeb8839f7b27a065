"""`posttrain serve --rag` and `posttrain chat --rag`: the real server in a subprocess, the official openai client.
The citations must be the retriever's own hits, and the prompt the model saw must be the documented template
with those chunks (checked through usage.prompt_tokens against the tokenizer)."""
from __future__ import annotations

import openai
import pytest

from conftest import run_cli, serving
from posttrain.engine import Engine, SamplingParams
from posttrain.rag.prompt import DEFAULT_TEMPLATE, Augmenter, render
from posttrain.rag.retrieve import Retriever
from posttrain.rag.sample import write_restaurant_corpus

QUESTION = "How much does the lemon tart cost?"
K = 3


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    folder = tmp_path_factory.mktemp("docs")
    write_restaurant_corpus(folder, seed=2)
    out = tmp_path_factory.mktemp("index") / "idx.db"
    run_cli("rag", "index", folder, "--out", out, "--chunk-tokens", 48)
    return out


@pytest.fixture(scope="module")
def server(tiny_model, index, tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(["--model", tiny_model, "--rag", index, "--rag-k", K], log) as url:
        yield url
    assert "Traceback" not in log.read_text(), log.read_text()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def expected(index, tiny_model):
    """The hits the server must cite and the prompt length it must report, computed here."""
    retriever = Retriever(index)
    hits = retriever.search(QUESTION, K)
    retriever.close()
    engine = Engine.load(tiny_model)
    augmented = engine.chat_prompt([{"role": "user", "content": render(DEFAULT_TEMPLATE, QUESTION, hits)}])
    plain = engine.chat_prompt([{"role": "user", "content": QUESTION}])
    return {"citations": [h.citation() for h in hits], "rag_tokens": len(augmented), "plain_tokens": len(plain)}


def test_chat_completion_carries_the_retrieved_citations(client, tiny_model, expected):
    response = client.chat.completions.create(model=str(tiny_model), max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": QUESTION}])
    citations = response.model_extra["citations"]
    assert citations == expected["citations"] and len(citations) == K
    assert all({"source", "text", "score"} <= set(c) for c in citations)
    assert "lemon tart" in " ".join(c["text"] for c in citations)
    assert response.usage.prompt_tokens == expected["rag_tokens"]  # the template with exactly these chunks


def test_the_final_stream_chunk_carries_the_citations(client, tiny_model, expected):
    for include_usage in (False, True):
        chunks = list(client.chat.completions.create(
            model=str(tiny_model), max_tokens=4, temperature=0, stream=True,
            stream_options={"include_usage": True} if include_usage else None,
            messages=[{"role": "user", "content": QUESTION}]))
        assert chunks[-1].model_extra.get("citations") == expected["citations"]
        assert all("citations" not in c.model_extra for c in chunks[:-1])
        if include_usage:
            assert chunks[-1].usage.prompt_tokens == expected["rag_tokens"]


def test_a_request_can_turn_retrieval_off(client, tiny_model, expected):
    response = client.chat.completions.create(model=str(tiny_model), max_tokens=4, temperature=0,
                                              messages=[{"role": "user", "content": QUESTION}],
                                              extra_body={"rag": False})
    assert "citations" not in response.model_extra
    assert response.usage.prompt_tokens == expected["plain_tokens"]


def test_only_the_last_user_turn_retrieves(client, tiny_model, index):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "When does the kitchen open?"},
                {"role": "assistant", "content": "At nine."}, {"role": "user", "content": QUESTION}]
    response = client.chat.completions.create(model=str(tiny_model), max_tokens=2, temperature=0, messages=messages)
    retriever = Retriever(index)
    hits = retriever.search(QUESTION, K)
    retriever.close()
    engine = Engine.load(tiny_model)
    augmented = messages[:-1] + [{"role": "user", "content": render(DEFAULT_TEMPLATE, QUESTION, hits)}]
    assert response.usage.prompt_tokens == len(engine.chat_prompt(augmented))
    assert [c["source"] for c in response.model_extra["citations"]] == [h.source for h in hits]


def test_chat_prints_the_sources_under_each_answer(tiny_model, index):
    retriever = Retriever(index)
    augment = Augmenter(retriever, k=2)
    lines = iter([QUESTION, "/exit"])
    written: list[str] = []
    from posttrain.chat import chat_loop

    chat_loop(Engine.load(tiny_model), SamplingParams(max_new_tokens=3, temperature=0), read=lambda _: next(lines),
              write=written.append, rag=augment)
    hits = retriever.search(QUESTION, 2)
    retriever.close()
    output = "".join(written)
    assert f"sources: [1] {hits[0].source}" in output and f"[2] {hits[1].source}" in output
