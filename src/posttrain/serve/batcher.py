"""Continuous batching for the server: one worker thread owns the model and the engine's Scheduler.

Handlers (on the asyncio loop) put a Job on a queue and read its events from an asyncio.Queue. Between decoding
steps the worker turns every newly queued job into rows (one per choice) and adds them to the scheduler, which
admits waiting rows whenever fewer than `max_rows` decode (a job's prompts x n rows count like any others, so
one large request cannot exceed the cap: its rows join as places free up) and drops rows as they finish. A
short request sent while a long one decodes therefore joins at the next step and is answered after its own
tokens, not after the long one's.

Every row carries its own sampling settings and random stream (seeded requests too: `sampler.row_key` of the
seed and the choice index), so requests with different settings share a batch and a seed gives the same answer
whatever else is being served. With LoRA adapters each row names its adapter (peft's mixed-adapter batches:
`adapter_names`), "__base__" for the base model.

Events sent to a job: ("delta", choice, text) for streamed jobs; ("done", completions, prompt_logprobs); or
("error", exception). A job whose client went away is marked cancelled; its rows leave at the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass, field

from ..engine import Engine, Row, SamplingParams
from ..sampler import row_key

log = logging.getLogger("posttrain")
_ids = itertools.count()


@dataclass
class Job:
    model: str  # served model name: the base's or an adapter's
    prompts: list[list[int]]  # one per choice (a prompt asked with n=3 is here 3 times)
    params: SamplingParams  # n = 1: choices are separate prompts
    stream: bool = False
    prompt_logprobs: int | None = None  # score the distinct prompts too, with this many top log-probs
    prompt_tokens: int = 0  # as usage counts them (each prompt once, whatever n)
    images: object = None  # the prompts' images (data/vision.Pictures; a chat request's, shared by its choices)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    id: int = field(default_factory=lambda: next(_ids))
    rows: list[Row] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)  # characters streamed per choice
    scores: list | None = None

    def send(self, *event) -> None:
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Batcher:
    def __init__(self, engine: Engine, base_name: str, adapters: list[str], *, max_rows: int = 64):
        self.engine = engine
        self.base_name = base_name
        self.adapters = adapters
        self.max_rows = max_rows
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.scheduler = engine.scheduler(max_rows)
        self.open: dict[int, Job] = {}
        self.stats = {"running_rows": 0, "waiting_rows": 0, "largest_batch": 0, "cancelled": 0, "requests": 0,
                      "failed": 0, "prompt_tokens": 0, "completion_tokens": 0, "steps": 0}
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
        while True:
            try:  # wait for work when idle; between steps take what has arrived
                incoming = [self.queue.get()] if not self.scheduler.busy else []
                while True:
                    incoming.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            if None in incoming:
                return
            for job in incoming:
                self._admit(job)
            self._cancel_gone()
            try:
                advanced = self.scheduler.step()
            except Exception as exc:  # noqa: BLE001 - a failed step fails the requests in it, not the server
                self._fail_all(exc)
                continue
            self._report(advanced)

    def _admit(self, job: Job) -> None:
        if job.cancelled.is_set():
            return
        self.stats["requests"] += 1
        adapter = None if not self.adapters else ("__base__" if job.model == self.base_name else job.model)
        try:
            if job.prompt_logprobs is not None:
                job.scores = self._score(job, adapter)
        except Exception as exc:  # noqa: BLE001
            self.stats["failed"] += 1
            job.send("error", exc)
            return
        job.rows = [Row(prompt, job.params, row_key(job.params.seed, choice), prompt_index=choice, adapter=adapter,
                        wants_text=job.stream, owner=job, images=job.images)
                    for choice, prompt in enumerate(job.prompts)]
        job.sent = [0] * len(job.rows)
        self.stats["prompt_tokens"] += job.prompt_tokens
        self.open[job.id] = job
        self.scheduler.add(job.rows)

    def _score(self, job: Job, adapter: str | None) -> list:
        """Prompt log-probs for each of the job's prompts (each distinct prompt scored once)."""
        distinct = list(dict.fromkeys(map(tuple, job.prompts)))
        scored = self.engine.prompt_logprobs([list(p) for p in distinct], job.prompt_logprobs, adapter=adapter)
        scored = dict(zip(distinct, scored))
        return [scored[tuple(p)] for p in job.prompts]

    def _cancel_gone(self) -> None:
        for job in list(self.open.values()):
            if job.cancelled.is_set():
                for row in job.rows:
                    if row.finish_reason is None:
                        row.finish_reason = "cancelled"
                del self.open[job.id]
                self.stats["cancelled"] += 1

    def _report(self, advanced: list[Row]) -> None:
        """Stream the new text of streamed rows; answer each job whose rows have all finished."""
        scheduler = self.scheduler
        self.stats.update(running_rows=scheduler.active, waiting_rows=len(scheduler.waiting),
                          largest_batch=scheduler.stats["largest_batch"], steps=scheduler.stats["steps"])
        self.stats["completion_tokens"] += len(advanced)
        finished_jobs = {}
        for row in advanced:
            job = row.owner
            if job.id not in self.open:
                continue
            if job.stream and row.finish_reason is None:
                text = self.engine.visible_text(row)
                if len(text) > job.sent[row.prompt_index]:
                    job.send("delta", row.prompt_index, text[job.sent[row.prompt_index]:])
                    job.sent[row.prompt_index] = len(text)
            if row.finish_reason is not None:
                finished_jobs[job.id] = job
        for job in finished_jobs.values():
            if all(row.finish_reason is not None for row in job.rows):
                del self.open[job.id]
                completions = [self.engine.finish(row) for row in job.rows]
                if job.stream:  # the rest of each choice's text, held back until it was clear
                    for choice, completion in enumerate(completions):
                        if len(completion.text) > job.sent[choice]:
                            job.send("delta", choice, completion.text[job.sent[choice]:])
                job.send("done", completions, job.scores)
        self.stats["running_rows"] = scheduler.active

    def _fail_all(self, exc: Exception) -> None:
        log.exception("a decoding step failed; failing the requests in it", exc_info=exc)
        for job in self.open.values():
            self.stats["failed"] += 1
            job.send("error", exc)
        self.open.clear()
        self.scheduler = self.engine.scheduler(self.max_rows)
