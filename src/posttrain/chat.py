"""`posttrain chat`: a multi-turn conversation in the terminal, the answer streamed as it is generated.

Lines typed are user turns; `/reset` starts the conversation again (keeping --system), `/exit` or end of input
quits. The conversation is rendered with the tokenizer's chat template at every turn.
"""
from __future__ import annotations

import sys

from .engine import Engine, SamplingParams

HELP = "type a message; /reset starts over, /exit quits"


def chat_loop(engine: Engine, params: SamplingParams, system: str | None = None, read=input,
              write=sys.stdout.write, rag=None) -> None:
    """rag: a rag.prompt.Augmenter; each user turn then retrieves, the answer is followed by its sources, and
    the history keeps the turn as typed (the context of earlier turns is not carried along)."""
    def fresh() -> list[dict]:
        return [{"role": "system", "content": system}] if system else []

    messages = fresh()
    write(f"{HELP}\n")
    while True:
        try:
            line = read("you> ")
        except EOFError:
            write("\n")
            return
        text = line.strip()
        if text == "/exit":
            return
        if text == "/reset":
            messages = fresh()
            write("(conversation reset)\n")
            continue
        if not text:
            continue
        messages.append({"role": "user", "content": line})
        write("assistant> ")
        answer = ""
        prompt_messages, citations = rag(messages) if rag else (messages, None)
        for delta in engine.stream(engine.chat_prompt(prompt_messages), params):
            write(delta.text)
            sys.stdout.flush()
            answer += delta.text
        write("\n")
        if rag:
            from .rag.prompt import format_citations

            write(format_citations(citations) + "\n")
        messages.append({"role": "assistant", "content": answer})


def run_chat(model: str, adapter: str | None, system: str | None, params: SamplingParams,
             chat_template: str | None = None, rag: str | None = None, rag_k: int = 5, rag_mode: str | None = None,
             rag_template: str | None = None, quantize: str | None = None, device: str | None = None,
             dtype: str | None = None) -> None:
    augmenter = None
    if rag:
        from .rag.prompt import load_augmenter

        augmenter = load_augmenter(rag, rag_k, rag_mode, rag_template)
    engine = Engine.load(model, adapter, chat_template=chat_template, quantize=quantize, device=device, dtype=dtype)
    engine.chat_prompt([{"role": "user", "content": "hi"}])  # no template: one clear error before the prompt
    chat_loop(engine, params, system, rag=augmenter)
