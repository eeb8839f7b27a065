"""Ollama Modelfile beside a GGUF file: FROM, a TEMPLATE in Ollama's Go-template syntax, stop parameters.

A chat template is Jinja; Ollama's is Go's text/template over `.Messages`. There is no general translation,
so we recognise a template by what it renders: a probe conversation is rendered by the model's own Jinja
template and by a plain-Python renderer of each format we know; when one matches exactly, that format's Go
template (equivalent on every conversation of system/user/assistant turns) is written. Otherwise the
Modelfile has no TEMPLATE and the caller is told so. Tool definitions are not part of the translation.
"""
from __future__ import annotations

from pathlib import Path

PROBE = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 3?"},
         {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"}]


def _chatml(messages: list[dict]) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages) \
        + "<|im_start|>assistant\n"


# Go template: each message as <|im_start|>ROLE\nCONTENT<|im_end|>\n, then the assistant's opening line
CHATML_GO = ("{{- range .Messages }}<|im_start|>{{ .Role }}\n"
             "{{ .Content }}<|im_end|>\n"
             "{{ end }}<|im_start|>assistant\n")


def _llama3(messages: list[dict]) -> str:
    body = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>"
                   for m in messages)
    return "<|begin_of_text|>" + body + "<|start_header_id|>assistant<|end_header_id|>\n\n"


LLAMA3_GO = ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
             "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n")

FORMATS = {  # name: (renderer, Go template, stop strings)
    "chatml": (_chatml, CHATML_GO, ["<|im_end|>", "<|im_start|>"]),
    "llama3": (_llama3, LLAMA3_GO, ["<|eot_id|>", "<|start_header_id|>"]),
}


def detect_format(tokenizer) -> str | None:
    """The name of the known format the tokenizer's chat template renders exactly, or None."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    for name, (render, _, _) in FORMATS.items():
        for probe in (PROBE, PROBE[1:]):  # with and without a system turn
            try:
                text = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
            except Exception:  # noqa: BLE001 - a template that rejects the probe is not this format
                text = None
            if text != render(probe):
                break
        else:
            return name
    return None


def modelfile_text(gguf_name: str, tokenizer) -> tuple[str, str | None]:
    """(Modelfile text, a note for the user when the template could not be translated)."""
    lines = [f"FROM ./{gguf_name}"]
    stops: list[str] = []
    note = None
    name = detect_format(tokenizer)
    if name is not None:
        _, go_template, stops = FORMATS[name]
        lines.append(f'TEMPLATE """{go_template}"""')
    elif getattr(tokenizer, "chat_template", None):
        note = ("the chat template is not one this exporter translates to Ollama's syntax (chatml, llama3): the "
                "Modelfile has no TEMPLATE line; write one by hand, or rely on Ollama reading the GGUF's template")
    else:
        note = "the tokenizer has no chat template: the Modelfile has no TEMPLATE line (plain completion)"
    eos = tokenizer.eos_token
    for stop in stops + ([eos] if eos and eos not in stops else []):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines) + "\n", note


def write_modelfile(gguf_path: Path, tokenizer) -> tuple[Path, str | None]:
    text, note = modelfile_text(gguf_path.name, tokenizer)
    path = gguf_path.parent / "Modelfile"
    temp = path.with_name(".Modelfile.partial")
    temp.write_text(text, encoding="utf-8")
    temp.replace(path)
    return path, note
