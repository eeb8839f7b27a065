"""Chat tab: talk to a model (+ LoRA adapter, + RAG index), answers streamed by the generation engine; or two models
side by side answering the same message. Every judgement becomes training data at once, appended atomically:

- thumbs up / down on an answer -> feedback/kto.jsonl: {messages (the conversation ending with that answer),
  label: true|false, model}: unpaired feedback for `stage: kto`;
- "A is better" / "B is better" side by side -> feedback/pairs.jsonl: {prompt (the conversation before the
  answers), chosen, rejected, chosen_model, rejected_model}: pairs for `stage: rm` / `dpo`. Both conversations
  then continue with the better answer, so the next pair has one prompt again. A tie writes no pair (neither
  format has one) and is counted.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict

from gradio import LikeData

from ..errors import ConfigError, PosttrainError
from .workspace import Workspace, append_rows, path_dropdown

KTO_FILE, PAIRS_FILE = "feedback/kto.jsonl", "feedback/pairs.jsonl"
KEEP_ENGINES = 2


class ChatTab:
    def __init__(self, ws: Workspace):
        self.ws = ws
        self.engines: OrderedDict[tuple, object] = OrderedDict()
        self.augmenters: dict[tuple, object] = {}
        self.lock = threading.Lock()
        self.ties = 0

    # ------------------------------------------------------------ models
    def engine(self, model: str, adapter: str | None):
        """The engine for a model (+ adapter), loaded once; the two most recently used stay in memory."""
        from ..engine import Engine

        model_dir = self.ws.path(model, "model", exists=True)
        adapter_dir = self.ws.optional(adapter, "adapter")
        key = (str(model_dir), str(adapter_dir) if adapter_dir else None)
        with self.lock:
            if key not in self.engines:
                self.engines[key] = Engine.load(str(model_dir), str(adapter_dir) if adapter_dir else None)
                while len(self.engines) > KEEP_ENGINES:
                    self.engines.popitem(last=False)
            self.engines.move_to_end(key)
            return self.engines[key]

    def augmenter(self, index: str | None, k: int = 3):
        if not str(index or "").strip():
            return None
        from ..rag.prompt import load_augmenter

        path = self.ws.path(index, "RAG index", exists=True)
        key = (str(path), k)
        if key not in self.augmenters:
            self.augmenters[key] = load_augmenter(str(path), k)
        return self.augmenters[key]

    def _stream(self, engine, history: list[dict], system: str, rag, temperature: float, max_new_tokens: int):
        """Text so far of the answer to `history` (its last turn is the user's), as it is generated."""
        from ..engine import SamplingParams

        messages = ([{"role": "system", "content": system}] if str(system or "").strip() else []) + \
            [{"role": m["role"], "content": _text(m["content"])} for m in history]
        citations = None
        if rag is not None:
            messages, citations = rag(messages)
        params = SamplingParams(max_new_tokens=int(max_new_tokens), temperature=float(temperature))
        text = ""
        for delta in engine.stream(engine.chat_prompt(messages), params):
            text += delta.text
            yield text, citations

    # ------------------------------------------------------------ the API
    def chat(self, message: str, history: list | None, model: str, adapter: str, rag: str, system: str,
             temperature: float, max_new_tokens: float):
        """Stream one answer: yields the conversation with the answer so far, and its sources (RAG)."""
        if not str(message or "").strip():
            raise ConfigError("type a message")
        engine, augmenter = self.engine(model, adapter), self.augmenter(rag)
        history = _clean(history) + [{"role": "user", "content": message}]
        for text, citations in self._stream(engine, history, system, augmenter, temperature, max_new_tokens):
            yield history + [{"role": "assistant", "content": text}], _sources(citations)

    def chat_pair(self, message: str, history_a: list | None, history_b: list | None, model_a: str, adapter_a: str,
                  model_b: str, adapter_b: str, rag: str, system: str, temperature: float, max_new_tokens: float):
        """Two models answer the same message, streamed side by side."""
        if not str(message or "").strip():
            raise ConfigError("type a message")
        engines = [self.engine(model_a, adapter_a), self.engine(model_b, adapter_b)]
        augmenter = self.augmenter(rag)
        histories = [_clean(h) + [{"role": "user", "content": message}] for h in (history_a, history_b)]
        streams = [self._stream(e, h, system, augmenter, temperature, max_new_tokens)
                   for e, h in zip(engines, histories)]
        texts, live = ["", ""], [True, True]
        while any(live):
            for side in (0, 1):
                if live[side]:
                    try:
                        texts[side] = next(streams[side])[0]
                    except StopIteration:
                        live[side] = False
            yield tuple(h + [{"role": "assistant", "content": t}] for h, t in zip(histories, texts))

    def thumbs(self, history: list, index: float, liked: bool, model: str = "") -> str:
        """Unpaired feedback on the assistant answer at `index`: one KTO row."""
        history, index = _clean(history), int(index)
        if not 0 <= index < len(history) or history[index]["role"] != "assistant":
            raise ConfigError(f"message {index} is not an answer of the model")
        row = {"messages": history[:index + 1], "label": bool(liked), "model": model or "",
               "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        count = append_rows(self.ws.root / KTO_FILE, [row])
        return f"{'👍' if liked else '👎'} saved to {KTO_FILE} ({count} rows)"

    def compare(self, history_a: list, history_b: list, verdict: str, model_a: str = "", model_b: str = ""):
        """A side-by-side judgement on the last answers: "A", "B" or "tie". Returns (message, history A, history B):
        both conversations continue with the better answer (A's on a tie)."""
        a, b = _clean(history_a), _clean(history_b)
        if not a or not b or a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
            raise ConfigError("both sides need an answer to judge")
        if a[:-1] != b[:-1]:
            raise ConfigError("the two conversations differ before these answers; judge every turn")
        verdict = str(verdict).strip()
        if verdict not in ("A", "B", "tie"):
            raise ConfigError("verdict: A, B or tie")
        if verdict == "tie":
            self.ties += 1
            message = f"tie: no pair written ({self.ties} ties so far)"
        else:
            better, worse = (a, b) if verdict == "A" else (b, a)
            models = (model_a, model_b) if verdict == "A" else (model_b, model_a)
            row = {"prompt": a[:-1], "chosen": better[-1]["content"], "rejected": worse[-1]["content"],
                   "chosen_model": models[0] or "", "rejected_model": models[1] or "",
                   "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
            if row["chosen"] == row["rejected"]:
                message = "both answers are the same: no pair written"
            else:
                count = append_rows(self.ws.root / PAIRS_FILE, [row])
                message = f"{verdict} is better: saved to {PAIRS_FILE} ({count} pairs)"
        kept = a if verdict in ("A", "tie") else b
        return message, kept, [dict(m) for m in kept]

    # ------------------------------------------------------------ the page
    def build(self):
        import gradio as gr

        gr.Markdown("Chat with a model from the workdir (answers are streamed). 👍/👎 on an answer saves it as KTO "
                    f"feedback ({KTO_FILE}); side by side, **A is better** / **B is better** saves a preference "
                    f"pair ({PAIRS_FILE}) for rm or dpo.")
        with gr.Row():
            model_a = path_dropdown(self.ws.models(), label="model (A)", elem_id="chat-model")
            adapter_a = path_dropdown(self.ws.adapters(), label="adapter (A, optional)")
            rag = path_dropdown(self.ws.files((".db",)), label="RAG index (optional)")
        with gr.Row():
            side_by_side = gr.Checkbox(False, label="side by side with model B", elem_id="chat-side")
            model_b = path_dropdown(self.ws.models(), label="model (B)", visible=False, elem_id="chat-model-b")
            adapter_b = path_dropdown(self.ws.adapters(), label="adapter (B)", visible=False)
        with gr.Accordion("sampling", open=False):
            system = gr.Textbox(label="system prompt")
            temperature = gr.Slider(0, 2, 0.7, label="temperature (0: greedy)")
            max_new = gr.Number(128, precision=0, label="max new tokens")
        with gr.Row():
            bot_a = gr.Chatbot(label="A", elem_id="chat-a", height=360)
            bot_b = gr.Chatbot(label="B", elem_id="chat-b", height=360, visible=False)
        sources = gr.Markdown()
        with gr.Row():
            message = gr.Textbox(label="message", scale=4, elem_id="chat-message")
            send = gr.Button("Send", variant="primary", elem_id="chat-send")
            clear = gr.Button("Clear")
        with gr.Row(visible=False) as verdicts:
            a_better = gr.Button("A is better", elem_id="chat-a-better")
            b_better = gr.Button("B is better", elem_id="chat-b-better")
            tie = gr.Button("tie", elem_id="chat-tie")
        saved = gr.Markdown(elem_id="chat-saved")
        verdict_in = gr.Textbox(visible=False, label="verdict")
        index_in, liked_in = gr.Number(visible=False, label="index", precision=0), gr.Checkbox(visible=False,
                                                                                               label="liked")
        hidden_a, hidden_b = gr.JSON(visible=False, label="history_a"), gr.JSON(visible=False, label="history_b")

        side_by_side.change(lambda on: [gr.update(visible=on)] * 4, side_by_side,
                            [model_b, adapter_b, bot_b, verdicts], api_visibility="private")

        def send_message(text, a, b, pair, ma, aa, mb, ab, index, sys, temp, new):
            try:
                if pair:
                    for left, right in self.chat_pair(text, a, b, ma, aa, mb, ab, index, sys, temp, new):
                        yield left, right, "", gr.skip()
                else:
                    for left, cited in self.chat(text, a, ma, aa, index, sys, temp, new):
                        yield left, gr.skip(), cited, gr.skip()
                yield gr.skip(), gr.skip(), gr.skip(), ""
            except PosttrainError as exc:
                yield gr.skip(), gr.skip(), f"**{exc}**", gr.skip()
        inputs = [message, bot_a, bot_b, side_by_side, model_a, adapter_a, model_b, adapter_b, rag, system,
                  temperature, max_new]
        gr.on([send.click, message.submit], send_message, inputs, [bot_a, bot_b, sources, message],
              api_visibility="private", concurrency_id="models")
        clear.click(lambda: ([], [], ""), None, [bot_a, bot_b, saved], api_visibility="private")

        def liked(history, model_name, adapter_name, data: LikeData):
            try:
                return self.thumbs(history, data.index if isinstance(data.index, int) else data.index[0],
                                   data.liked is True or data.liked == "Like", _name(self.ws, model_name, adapter_name))
            except PosttrainError as exc:
                return f"**{exc}**"
        bot_a.like(liked, [bot_a, model_a, adapter_a], saved, api_visibility="private")
        bot_b.like(liked, [bot_b, model_b, adapter_b], saved, api_visibility="private")
        for button, verdict in ((a_better, "A"), (b_better, "B"), (tie, "tie")):
            def judged(a, b, ma, aa, mb, ab, verdict=verdict):
                try:
                    return self.compare(a, b, verdict, _name(self.ws, ma, aa), _name(self.ws, mb, ab))
                except PosttrainError as exc:
                    return f"**{exc}**", gr.skip(), gr.skip()
            button.click(judged, [bot_a, bot_b, model_a, adapter_a, model_b, adapter_b], [saved, bot_a, bot_b],
                         api_visibility="private")

        # the scriptable endpoints
        api = gr.Button(visible=False)
        api.click(self.chat, [message, hidden_a, model_a, adapter_a, rag, system, temperature, max_new],
                  [hidden_a, sources], api_name="chat", concurrency_id="models")
        api.click(self.chat_pair, [message, hidden_a, hidden_b, model_a, adapter_a, model_b, adapter_b, rag, system,
                                   temperature, max_new], [hidden_a, hidden_b], api_name="chat_side_by_side",
                  concurrency_id="models")
        api.click(self.thumbs, [hidden_a, index_in, liked_in, model_a], saved, api_name="chat_thumbs")
        api.click(self.compare, [hidden_a, hidden_b, verdict_in, model_a, model_b], [saved, hidden_a, hidden_b],
                  api_name="chat_compare")

        def lists():
            models, adapters = self.ws.models(), self.ws.adapters()
            return (gr.update(choices=models), gr.update(choices=adapters), gr.update(choices=models),
                    gr.update(choices=adapters), gr.update(choices=self.ws.files((".db",))))
        return {"lists": (lists, [model_a, adapter_a, model_b, adapter_b, rag])}


def _text(content) -> str:
    """A chatbot message's content as plain text (gradio may hand back a list of parts)."""
    if isinstance(content, list):
        return "".join(p.get("text", "") if isinstance(p, dict) else str(p) for p in content)
    if isinstance(content, dict):
        return str(content.get("text", ""))
    return str(content or "")


def _clean(history) -> list[dict]:
    """Only role and text of each message (gradio adds metadata)."""
    return [{"role": m["role"], "content": _text(m.get("content"))} for m in (history or [])
            if isinstance(m, dict) and m.get("role") in ("user", "assistant", "system")]


def _sources(citations) -> str:
    if citations is None:
        return ""
    from ..rag.prompt import format_citations

    return format_citations(citations)


def _name(ws: Workspace, model: str, adapter: str | None) -> str:
    return str(model or "") + (f" + {adapter}" if str(adapter or "").strip() else "")
