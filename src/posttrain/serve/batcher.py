"""Dynamic batching: one worker thread owns the model and decodes requests that arrive together as one batch.

Handlers (on the asyncio loop) put a Job on a queue and read its events from an asyncio.Queue. The worker takes
the first waiting job, lets others arrive (it waits `window_s` after the latest arrival, `max_wait_s` at most),
and decodes together every waiting job compatible with the first: the same served model (base or LoRA adapter:
a batch runs under one adapter) and the same sampling settings. A job's own `max_new_tokens` may be smaller
than its batch's: its rows are ended ("length") when they reach it. A job with a seed is decoded alone, so that
the same seed gives the same answer whatever else is being served. Greedy jobs ignore seed, top_p and top_k,
so they all batch together. A batch does not take new rows once started (no continuous batching).

Events sent to a job: ("delta", choice, text) for streamed jobs; ("done", completions, prompt_logprobs); or
("error", exception). A job whose client went away is marked cancelled; its rows are ended at the next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from ..engine import Engine, SamplingParams

_ids = itertools.count()


@dataclass
class Job:
    model: str  # served model name: the base's or an adapter's
    prompts: list[list[int]]  # one per choice (a prompt asked with n=3 is here 3 times)
    params: SamplingParams  # n = 1: choices are separate prompts
    stream: bool = False
    prompt_logprobs: int | None = None  # score the distinct prompts too, with this many top log-probs
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))

    def key(self) -> tuple:
        p = self.params
        if p.temperature == 0:
            return (self.model, 0.0, 1.0, 0, tuple(p.stop), p.top_logprobs, None)
        return (self.model, p.temperature, p.top_p, p.top_k, tuple(p.stop), p.top_logprobs,
                None if p.seed is None else ("alone", self.id))

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    def __init__(self, engine: Engine, base_name: str, adapters: list[str], *, window_s: float = 0.01,
                 max_wait_s: float = 0.05, max_rows: int = 64):
        self.engine = engine
        self.base_name = base_name
        self.adapters = adapters
        self.window_s = window_s
        self.max_wait_s = max_wait_s
        self.max_rows = max_rows
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.stats = {"running_rows": 0, "batches": 0, "largest_batch": 0, "cancelled": 0}
        self.thread = threading.Thread(target=self._work, name="posttrain-batcher", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=5)

    def submit(self, job: Job) -> Job:
        job.loop = asyncio.get_running_loop()
        job.events = asyncio.Queue()
        self.queue.put(job)
        return job

    # ------------------------------------------------------------------ the worker thread

    def _work(self) -> None:
        pending: deque[Job] = deque()
        while True:
            if not pending:
                job = self.queue.get()
                if job is None:
                    return
                pending.append(job)
            if not self._collect(pending):
                return
            batch = self._take_batch(pending)
            try:
                self._run(batch)
            except Exception as exc:  # noqa: BLE001 - any failure goes back to the waiting requests
                for job in batch:
                    job.send("error", exc)

    def _collect(self, pending: deque[Job]) -> bool:
        """Let requests sent at about the same time join: wait while they keep arriving, `window_s` after the
        latest one, at most `max_wait_s` in all. False when the server is stopping."""
        start = last = time.monotonic()
        while True:
            now = time.monotonic()
            timeout = min(last + self.window_s, start + self.max_wait_s) - now
            try:
                job = self.queue.get(timeout=timeout) if timeout > 0 else self.queue.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            pending.append(job)
            last = time.monotonic()

    def _take_batch(self, pending: deque[Job]) -> list[Job]:
        key = pending[0].key()
        batch, rows = [], 0
        for job in list(pending):
            if job.key() == key and (not batch or rows + len(job.prompts) <= self.max_rows):
                batch.append(job)
                rows += len(job.prompts)
                pending.remove(job)
        return batch

    def _adapter(self, model: str):
        """Run the batch under its adapter: peft's set_adapter, or disable_adapter for the base."""
        if not self.adapters:
            return contextlib.nullcontext()
        if model == self.base_name:
            return self.engine.model.disable_adapter()
        self.engine.model.set_adapter(model)
        return contextlib.nullcontext()

    def _run(self, batch: list[Job]) -> None:
        batch = [job for job in batch if not job.cancelled.is_set()]
        if not batch:
            return
        engine = self.engine
        with self._adapter(batch[0].model):
            scores = {job.id: self._score(job) for job in batch if job.prompt_logprobs is not None}
            owners = [(job, choice) for job in batch for choice in range(len(job.prompts))]
            params = replace(batch[0].params, max_new_tokens=max(job.params.max_new_tokens for job in batch), n=1)
            self.stats["batches"] += 1
            self.stats["largest_batch"] = max(self.stats["largest_batch"], len(owners))
            self.stats["running_rows"] = len(owners)
            sent = [0] * len(owners)  # characters streamed per row
            open_jobs = {job.id: job for job in batch}
            try:
                for rows in engine.decode([job.prompts[choice] for job, choice in owners], params):
                    for index, (row, (job, choice)) in enumerate(zip(rows, owners)):
                        if row.finish_reason is None:
                            if job.cancelled.is_set():
                                row.finish_reason = "cancelled"
                            elif len(row.token_ids) >= job.params.max_new_tokens:
                                row.finish_reason = "length"
                        if job.stream and row.finish_reason is None:
                            text = engine.visible_text(row, params.stop)
                            if len(text) > sent[index]:
                                job.send("delta", choice, text[sent[index]:])
                                sent[index] = len(text)
                    self._answer_finished(rows, owners, sent, open_jobs, scores)
            finally:
                self.stats["running_rows"] = 0

    def _score(self, job: Job) -> list:
        """Prompt log-probs for each of the job's prompts (each distinct prompt scored once)."""
        distinct = list(dict.fromkeys(map(tuple, job.prompts)))
        scored = dict(zip(distinct, self.engine.prompt_logprobs([list(p) for p in distinct], job.prompt_logprobs)))
        return [scored[tuple(p)] for p in job.prompts]

    def _answer_finished(self, rows, owners, sent, open_jobs: dict, scores: dict) -> None:
        """Answer each job whose rows have all finished, without waiting for the rest of the batch."""
        for job_id, job in list(open_jobs.items()):
            mine = [index for index, (owner, _) in enumerate(owners) if owner is job]
            if any(rows[index].finish_reason is None for index in mine):
                continue
            del open_jobs[job_id]
            if job.cancelled.is_set():
                self.stats["cancelled"] += 1
                continue
            completions = [self.engine.finish(rows[index]) for index in mine]
            if job.stream:  # the rest of each choice's text, held back until it was clear
                for choice, (index, completion) in enumerate(zip(mine, completions)):
                    if len(completion.text) > sent[index]:
                        job.send("delta", choice, completion.text[sent[index]:])
            job.send("done", completions, scores.get(job_id))
