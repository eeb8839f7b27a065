"""Label tab: a person ranks sampled answers, which become preference pairs.

Answers come from a candidates file (`posttrain generate`'s output: {prompt, responses, ...}), sampled here
(`posttrain generate` runs as a job) or made elsewhere. Each prompt's answers are ordered by clicking a rank per
answer (ties allowed: the same rank twice); a prompt can be skipped or flagged. Every submission is appended at
once, atomically, to NAME.rankings.jsonl beside the candidates ({prompt, responses, ranks, labeller, item}: what
`posttrain data pairs` reads), skips and flags to NAME.skips.jsonl, so closing the browser loses nothing and
reopening continues with the labeller's first prompt not yet done. "Make pairs" runs `data pairs`' expansion
into NAME.pairs.jsonl (for stage rm / dpo). Several labellers may label one file; where they ranked the same
prompt, their agreement is shown. A judge model (rl.rewards.Judge) can suggest an order for the person to
correct, or rank the remaining prompts itself.
"""
from __future__ import annotations

import json
import time
from itertools import combinations
from pathlib import Path

from ..errors import ConfigError, PosttrainError
from .jobs import Jobs
from .workspace import Workspace, append_rows, path_dropdown, read_rows

MAX_K = 8  # answer slots on the page


def sibling(candidates: Path, kind: str) -> Path:
    """NAME.candidates.jsonl -> NAME.<kind>.jsonl (rankings, skips, pairs, judge-cache)."""
    stem = candidates.name.removesuffix(".jsonl").removesuffix(".candidates")
    return candidates.with_name(f"{stem}.{kind}.jsonl")


def prompt_markdown(prompt) -> str:
    if isinstance(prompt, list):
        return "\n\n".join(f"**{m.get('role', '?')}:** {m.get('content', '')}" for m in prompt if isinstance(m, dict))
    return str(prompt)


def prompt_text(prompt) -> str:
    """What a judge sees as the question: the string, or the last user message."""
    if isinstance(prompt, list):
        users = [m.get("content", "") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return str(users[-1]) if users else ""
    return str(prompt)


def agreement(rows: list[dict]) -> list[dict]:
    """For each two labellers who ranked the same prompts: how many answer pairs they ordered alike (better,
    worse or tied) out of all pairs of those prompts."""
    by_item: dict[int, dict[str, list]] = {}
    for row in rows:
        by_item.setdefault(row["item"], {})[row["labeller"]] = row["ranks"]
    found: dict[tuple, list[int]] = {}
    for labels in by_item.values():
        for a, b in combinations(sorted(labels), 2):
            ra, rb = labels[a], labels[b]
            if len(ra) != len(rb):
                continue
            counts = found.setdefault((a, b), [0, 0, 0])
            counts[0] += 1
            for i, j in combinations(range(len(ra)), 2):
                sign = lambda r: (r[i] > r[j]) - (r[i] < r[j])  # noqa: E731
                counts[1] += sign(ra) == sign(rb)
                counts[2] += 1
    return [{"labellers": [a, b], "prompts": p, "answer_pairs": n, "agree": same / n if n else None}
            for (a, b), (p, same, n) in found.items()]


class LabelTab:
    def __init__(self, ws: Workspace, jobs: Jobs):
        self.ws, self.jobs = ws, jobs

    # ------------------------------------------------------------ files
    def candidates(self, path: str) -> tuple[Path, list[dict]]:
        file = self.ws.path(path, "candidates file", exists=True)
        rows = read_rows(file)
        for number, row in enumerate(rows, 1):
            if "prompt" not in row or not isinstance(row.get("responses"), list) or len(row["responses"]) < 2:
                raise ConfigError(f"{self.ws.rel(file)}:{number}: a candidates row needs a prompt and at least 2 "
                                  f"responses (what `posttrain generate --n 2` or more writes)")
        return file, rows

    def answers(self, candidates: str, item) -> int:
        """How many answers the item on the page has (the rank inputs beyond them are unused)."""
        _, rows = self.candidates(candidates)
        return len(rows[self._item(item, rows)]["responses"])

    @staticmethod
    def _item(item, rows: list) -> int:
        if item is None or str(item).strip() == "":
            raise ConfigError("open a candidates file first")
        item = int(item)
        if not 0 <= item < len(rows):
            raise ConfigError(f"item {item} is not in the file (0..{len(rows) - 1})")
        return item

    @staticmethod
    def _labeller(name: str) -> str:
        name = str(name or "").strip()
        if not name or len(name) > 64:
            raise ConfigError("give a labeller name (up to 64 characters)")
        return name

    # ------------------------------------------------------------ the API (JSON in, JSON out)
    def sample(self, prompts: str, model: str, adapter: str, k: float, max_new_tokens: float, temperature: float,
               seed: float) -> tuple[str, str]:
        """`posttrain generate` K answers per prompt into label/NAME.candidates.jsonl (a job)."""
        try:
            source = self.ws.path(prompts, "prompts file", exists=True)
            model_dir = self.ws.path(model, "model", exists=True)
            out = self.ws.root / "label" / f"{source.stem}.candidates.jsonl"
            args = ["--model", str(model_dir), "--prompts", str(source), "--n", str(int(k)), "--out", str(out),
                    "--max-new-tokens", str(int(max_new_tokens)), "--temperature", str(float(temperature)),
                    "--seed", str(int(seed))]
            if str(adapter or "").strip():
                args += ["--adapter", str(self.ws.path(adapter, "adapter", exists=True))]
            job = self.jobs.start("generate", args, output=out, title=f"sample {int(k)} answers -> "
                                                                      f"{self.ws.rel(out)}")
        except PosttrainError as exc:
            return "", f"not started: {exc}"
        return job.id, f"sampling (job {job.id}) into {self.ws.rel(out)}: open it when the job has finished"

    def next_item(self, candidates: str, labeller: str) -> dict:
        """The labeller's first prompt not yet ranked, skipped or flagged (or {"finished": true})."""
        file, rows = self.candidates(candidates)
        labeller = self._labeller(labeller)
        done = {r["item"] for path in (sibling(file, "rankings"), sibling(file, "skips"))
                for r in read_rows(path) if r.get("labeller") == labeller}
        left = [i for i in range(len(rows)) if i not in done]
        state = {"candidates": self.ws.rel(file), "labeller": labeller, "total": len(rows), "done": len(done)}
        if not left:
            return {**state, "finished": True}
        item = left[0]
        return {**state, "finished": False, "item": item, "prompt": rows[item]["prompt"],
                "responses": rows[item]["responses"]}

    def submit(self, candidates: str, labeller: str, item: float, ranks, judge_ranks=None) -> dict:
        """Append one ranking (ranks: 1 = best, one per answer, equal = tie) and return the next prompt."""
        file, rows = self.candidates(candidates)
        labeller, item = self._labeller(labeller), self._item(item, rows)
        ranks = json.loads(ranks) if isinstance(ranks, str) else ranks
        responses = rows[item]["responses"]
        if not isinstance(ranks, list) or len(ranks) != len(responses) or \
                any(not str(r).strip().isdigit() for r in ranks):
            raise ConfigError(f"give a rank (1 = best) to each of the {len(responses)} answers")
        record = {"prompt": rows[item]["prompt"], "responses": responses, "ranks": [int(r) for r in ranks],
                  "labeller": labeller, "item": item, "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if judge_ranks:
            record["judge_ranks"] = judge_ranks
        append_rows(sibling(file, "rankings"), [record])
        return self.next_item(candidates, labeller)

    def skip(self, candidates: str, labeller: str, item: float, action: str = "skip", note: str = "") -> dict:
        """Skip (or flag: a bad prompt) one prompt; it is written to NAME.skips.jsonl, not to the rankings."""
        file, rows = self.candidates(candidates)
        labeller, item = self._labeller(labeller), self._item(item, rows)
        if action not in ("skip", "flag"):
            raise ConfigError("action: skip or flag")
        append_rows(sibling(file, "skips"), [{"item": item, "prompt": rows[item]["prompt"], "labeller": labeller,
                                             "action": action, "note": note or "",
                                             "time": time.strftime("%Y-%m-%dT%H:%M:%S")}])
        return self.next_item(candidates, labeller)

    def make_pairs(self, candidates: str) -> str:
        """`posttrain data pairs` on the rankings file: NAME.pairs.jsonl (written whole, then renamed)."""
        from ..data.preference import pairs_command

        file, _ = self.candidates(candidates)
        rankings, pairs = sibling(file, "rankings"), sibling(file, "pairs")
        if not rankings.is_file():
            raise ConfigError(f"nothing ranked yet in {self.ws.rel(file)}")
        partial = pairs.with_name(f".{pairs.name}.partial")
        line = pairs_command(str(rankings), str(partial))
        partial.replace(pairs)
        return line.replace(str(partial), self.ws.rel(pairs)).replace(str(rankings), self.ws.rel(rankings))

    def agreement(self, candidates: str) -> list[dict]:
        file, _ = self.candidates(candidates)
        return agreement(read_rows(sibling(file, "rankings")))

    def judge(self, candidates: str, item: float, url: str, model: str, rubric: str, mode: str) -> dict:
        """The judge's order of one prompt's answers: {ranks (1 = best, None = no readable verdict), scores,
        malformed}; verdicts are cached in NAME.judge-cache.jsonl."""
        file, rows = self.candidates(candidates)
        row = rows[self._item(item, rows)]
        judge = self._judge(file, url, model, rubric, mode)
        ranks, scores = judge.rank(prompt_text(row["prompt"]), [str(r) for r in row["responses"]])
        return {"item": int(item), "ranks": ranks, "scores": scores, **judge.stats}

    def judge_rest(self, candidates: str, url: str, model: str, rubric: str, mode: str) -> str:
        """The judge ranks every prompt no labeller has ranked yet (labeller "judge:MODEL")."""
        file, rows = self.candidates(candidates)
        ranked = {r["item"] for r in read_rows(sibling(file, "rankings"))}
        items = [i for i in range(len(rows)) if i not in ranked]
        judge = self._judge(file, url, model, rubric, mode)
        written, unreadable = [], 0
        for i in items:
            ranks, scores = judge.rank(prompt_text(rows[i]["prompt"]), [str(r) for r in rows[i]["responses"]])
            if any(r is None for r in ranks):
                unreadable += 1  # some answer got no readable verdict: left to a person
                continue
            written.append({"prompt": rows[i]["prompt"], "responses": rows[i]["responses"], "ranks": ranks,
                            "scores": scores, "labeller": f"judge:{model}", "item": i,
                            "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        if written:
            append_rows(sibling(file, "rankings"), written)
        return (f"the judge ranked {len(written)} of {len(items)} unranked prompts; {unreadable} left for a person "
                f"(malformed verdicts: {judge.stats['malformed']}, cached: {judge.stats['cached']}, requests: "
                f"{judge.stats['requests']})")

    def _judge(self, file: Path, url: str, model: str, rubric: str, mode: str):
        from ..rl.rewards import Judge

        if not str(url or "").startswith(("http://", "https://")):
            raise ConfigError("judge url: give the endpoint's http(s) address, e.g. http://127.0.0.1:8000/v1")
        return Judge(url, model, rubric, mode or "pointwise", cache=str(sibling(file, "judge-cache")))

    # ------------------------------------------------------------ the page
    def build(self):
        import gradio as gr

        gr.Markdown("Rank sampled answers: 1 = best; give two answers the same rank for a tie. Each submission is "
                    "saved at once to the rankings file beside the candidates; reopening continues where you "
                    "stopped. **Make pairs** turns the rankings into preference pairs for stage rm or dpo.")
        with gr.Accordion("sample answers (posttrain generate)", open=False):
            with gr.Row():
                prompts = path_dropdown(self.ws.data_files(), label="prompts file", elem_id="label-prompts")
                model = path_dropdown(self.ws.models(), label="model", elem_id="label-model")
                adapter = path_dropdown(self.ws.adapters(), label="adapter (optional)")
            with gr.Row():
                k = gr.Number(4, precision=0, label="answers per prompt (K)", minimum=2, maximum=MAX_K)
                max_new = gr.Number(64, precision=0, label="max new tokens")
                temperature = gr.Number(1.0, label="temperature")
                seed = gr.Number(0, precision=0, label="seed")
            sample = gr.Button("Sample", elem_id="label-sample")
            sample_job = gr.Textbox(label="job", interactive=False)
        with gr.Row():
            candidates = path_dropdown(self.ws.files((".candidates.jsonl",)), label="candidates file",
                                       elem_id="label-candidates")
            labeller = gr.Textbox("labeller", label="labeller", elem_id="label-labeller")
            open_button = gr.Button("Open", variant="primary", elem_id="label-open")
        progress = gr.Markdown(elem_id="label-progress")
        item = gr.Number(None, precision=0, label="item", interactive=False, elem_id="label-item")
        prompt = gr.Markdown(elem_id="label-prompt", container=True)
        answers, ranks = [], []
        for i in range(MAX_K):
            with gr.Row(visible=False) as row:
                answers.append((row, gr.Textbox(label=f"answer {i + 1}", lines=2, max_lines=8, interactive=False,
                                                scale=4, elem_id=f"label-answer-{i}")))
                ranks.append(gr.Radio([str(n) for n in range(1, MAX_K + 1)], label="rank", scale=2,
                                      elem_id=f"label-rank-{i}"))
        with gr.Row():
            submit = gr.Button("Submit ranking", variant="primary", elem_id="label-submit")
            skip = gr.Button("Skip", elem_id="label-skip")
            flag = gr.Button("Flag (bad prompt)", elem_id="label-flag")
        with gr.Accordion("AI feedback: a judge suggests the order", open=False):
            with gr.Row():
                judge_url = gr.Textbox(label="judge endpoint (OpenAI-compatible)",
                                       placeholder="http://127.0.0.1:8000/v1")
                judge_model = gr.Textbox(label="judge model name")
                judge_mode = gr.Radio(["pointwise", "pairwise"], value="pointwise", label="mode")
            rubric = gr.Textbox("Prefer answers that are correct, helpful, polite and brief.", label="rubric", lines=2)
            with gr.Row():
                suggest = gr.Button("Judge suggests", elem_id="label-judge")
                rest = gr.Button("Judge ranks the rest")
            judge_note = gr.Markdown()
            judge_state = gr.State(None)
        with gr.Row():
            pairs_button = gr.Button("Make pairs", elem_id="label-pairs")
            agree_button = gr.Button("Agreement between labellers")
        result = gr.Markdown(elem_id="label-result")
        hidden = gr.JSON(visible=False, label="ranks")

        rows = [r for r, _ in answers]
        boxes = [b for _, b in answers]

        def show(state: dict):
            """The page for one item (or the end of the file)."""
            if state.get("finished"):
                return ([f"**all {state['total']} prompts done** for {state['labeller']}: make pairs", None,
                         "nothing left to rank"] + [gr.update(visible=False)] * MAX_K + [""] * MAX_K
                        + [gr.update(value=None)] * MAX_K + [None])
            n = len(state["responses"])
            choices = [str(r) for r in range(1, n + 1)]
            return ([f"**{state['done']} / {state['total']}** done by {state['labeller']} · now: prompt "
                     f"{state['item'] + 1}", state["item"], prompt_markdown(state["prompt"])]
                    + [gr.update(visible=i < n) for i in range(MAX_K)]
                    + [str(state["responses"][i]) if i < n else "" for i in range(MAX_K)]
                    + [gr.update(choices=choices, value=None) for _ in range(MAX_K)] + [None])
        page = [progress, item, prompt, *rows, *boxes, *ranks, judge_state]

        def guard(fn):
            def run(*args):
                try:
                    return show(fn(*args))
                except PosttrainError as exc:
                    return [f"**{exc}**"] + [gr.skip()] * (len(page) - 1)
            return run

        open_button.click(guard(self.next_item), [candidates, labeller], page, api_visibility="private")
        submit.click(guard(lambda c, who, i, j, *r: self.submit(c, who, i, list(r[:self.answers(c, i)]), j)),
                     [candidates, labeller, item, judge_state, *ranks], page, api_visibility="private")
        skip.click(guard(lambda c, who, i: self.skip(c, who, i, "skip")), [candidates, labeller, item], page,
                   api_visibility="private")
        flag.click(guard(lambda c, who, i: self.skip(c, who, i, "flag")), [candidates, labeller, item], page,
                   api_visibility="private")

        def suggested(c, i, url, name, text, mode):
            try:
                verdict = self.judge(c, i, url, name, text, mode)
            except PosttrainError as exc:
                return [f"**{exc}**"] + [gr.skip()] * MAX_K + [None]
            ranks_shown = [gr.update(value=str(r) if r is not None else None) for r in verdict["ranks"]]
            note = (f"judge's order (correct it, then submit): ranks {verdict['ranks']}, scores "
                    f"{[None if s is None else round(s, 2) for s in verdict['scores']]}; malformed verdicts so far: "
                    f"{verdict['malformed']}")
            return [note] + ranks_shown + [gr.skip()] * (MAX_K - len(ranks_shown)) + [verdict["ranks"]]
        suggest.click(suggested, [candidates, item, judge_url, judge_model, rubric, judge_mode],
                      [judge_note, *ranks, judge_state], api_visibility="private")

        def said(fn):
            def run(*args):
                try:
                    value = fn(*args)
                except PosttrainError as exc:
                    return f"**{exc}**"
                return value if isinstance(value, str) else _agreement_text(value)
            return run
        rest.click(said(self.judge_rest), [candidates, judge_url, judge_model, rubric, judge_mode], judge_note,
                   api_visibility="private")
        pairs_button.click(said(self.make_pairs), candidates, result, api_visibility="private")
        agree_button.click(said(self.agreement), candidates, result, api_visibility="private")
        sample.click(self.sample, [prompts, model, adapter, k, max_new, temperature, seed], [sample_job, result],
                     api_name="label_sample")

        # the scriptable endpoints: plain values and JSON
        api = gr.Button(visible=False)
        api.click(self.next_item, [candidates, labeller], hidden, api_name="label_next")
        api.click(self.submit, [candidates, labeller, item, hidden], hidden, api_name="label_submit")
        api.click(lambda c, who, i: self.skip(c, who, i, "skip"), [candidates, labeller, item], hidden,
                  api_name="label_skip")
        api.click(lambda c, who, i: self.skip(c, who, i, "flag"), [candidates, labeller, item], hidden,
                  api_name="label_flag")
        api.click(self.make_pairs, candidates, result, api_name="label_pairs")
        api.click(self.agreement, candidates, hidden, api_name="label_agreement")
        api.click(self.judge, [candidates, item, judge_url, judge_model, rubric, judge_mode], hidden,
                  api_name="label_judge")
        api.click(self.judge_rest, [candidates, judge_url, judge_model, rubric, judge_mode], judge_note,
                  api_name="label_judge_rest")

        def lists():
            return (gr.update(choices=self.ws.files((".candidates.jsonl",))), gr.update(choices=self.ws.data_files()),
                    gr.update(choices=self.ws.models()))
        return {"lists": (lists, [candidates, prompts, model])}


def _agreement_text(found: list[dict]) -> str:
    if not found:
        return "no prompt has been ranked by two labellers yet"
    return "\n".join(f"- {a} vs {b}: {f['prompts']} shared prompts, {f['answer_pairs']} answer pairs, "
                     f"{100 * f['agree']:.0f}% ordered alike" for f in found for a, b in [f["labellers"]])
