"""`posttrain` subprocesses started from the UI: trainings, recipes, sampling, evals, exports.

Only posttrain sub-commands are launched (an argument list, never a shell string), each in its own session
with its output in a log file and its record (argv, pid, output) in WORKDIR/.posttrain-ui/jobs/, so a job
outlives the browser tab that started it, and even the UI server: a new page (or a restarted `posttrain ui`)
finds its record and re-attaches. Progress is read from what every run writes anyway: the progress bar in the
log (step / total, ETA), recipe step lines ("step 3 of 9: sft") and metrics.jsonl.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import ConfigError
from .workspace import Workspace, write_text

COMMANDS = ("train", "run", "generate", "eval", "export", "data", "score")  # what the UI may launch
BAR = re.compile(r"(\d+)/(\d+) \[([\d:]+)<([\d:?]+)")
RECIPE_STEP = re.compile(r"== step (\d+) of (\d+): (\S+) \((\S+)\).*?: (running|unchanged, skipped) -> (\S+)")
ENDINGS = (("error:", "failed"), ("interrupted:", "stopped"), ("Traceback", "failed"))


@dataclass
class Job:
    id: str
    kind: str  # the posttrain sub-command
    argv: list[str]
    log: str
    pid: int
    started_at: float
    output: str | None = None  # the directory or file it writes (output_dir, --out)
    title: str = ""
    proc_start: str | None = None  # /proc/PID/stat start time: a reused pid is not mistaken for the job
    returncode: int | None = None
    stop_requested: bool = False
    extra: dict = field(default_factory=dict)


class Jobs:
    def __init__(self, workspace: Workspace):
        self.ws = workspace
        self.dir = workspace.state / "jobs"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen] = {}
        self.lock = threading.Lock()

    # ------------------------------------------------------------ starting and stopping
    def start(self, command: str, args: list[str], output: Path | None = None, title: str = "",
              extra: dict | None = None) -> Job:
        if command not in COMMANDS:
            raise ConfigError(f"the UI launches only posttrain commands ({', '.join(COMMANDS)}), not {command!r}")
        if not all(isinstance(a, str) for a in args):
            raise ConfigError("job arguments must be strings")
        with self.lock:
            if output is not None:
                for job in self.list():
                    if job.output == str(output) and self.state(job) == "running":
                        raise ConfigError(f"{self.ws.rel(output)} is being written by job {job.id} ({job.title}); "
                                          f"wait for it to finish or stop it first")
            job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
            log = self.dir / f"{job_id}.log"
            argv = [sys.executable, "-m", "posttrain.cli", command, *args]
            env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
            with open(log, "wb") as handle:
                process = subprocess.Popen(argv, cwd=self.ws.root, stdout=handle, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, env=env, start_new_session=True)
            job = Job(job_id, command, argv, str(log), process.pid, time.time(), str(output) if output else None,
                      title or command, _proc_start(process.pid), extra=extra or {})
            self.children[job_id] = process
            self._save(job)
        return job

    def stop(self, job_id: str) -> str:
        """SIGTERM: a training writes a checkpoint after its current step and ends (see trainer.StopRequest);
        other commands end at once. Asked again while it is stopping: SIGKILL."""
        job = self.get(job_id)
        if self.state(job) != "running":
            return f"job {job.id} is not running"
        again = job.stop_requested
        os.kill(job.pid, signal.SIGKILL if again else signal.SIGTERM)
        job.stop_requested = True
        self._save(job)
        if again:
            return f"job {job.id}: killed"
        return (f"job {job.id}: stopping after the current step (a checkpoint is written first); press Stop again to "
                f"end it at once" if job.kind in ("train", "run") else f"job {job.id}: stopped")

    # ------------------------------------------------------------ records
    def _save(self, job: Job) -> None:
        write_text(self.dir / f"{job.id}.json", json.dumps(asdict(job), indent=1))

    def get(self, job_id: str) -> Job:
        job_id = str(job_id or "").strip()
        path = self.dir / f"{job_id}.json"
        if not re.fullmatch(r"[\w-]+", job_id) or not path.is_file():
            raise ConfigError(f"no job {job_id!r}")
        return Job(**json.loads(path.read_text()))

    def list(self, kinds: tuple[str, ...] | None = None) -> list[Job]:
        """Every job, newest first."""
        jobs = []
        for path in sorted(self.dir.glob("*.json"), reverse=True):
            try:
                job = Job(**json.loads(path.read_text()))
            except (ValueError, TypeError):
                continue
            if kinds is None or job.kind in kinds:
                jobs.append(job)
        return jobs

    def latest(self, kinds: tuple[str, ...]) -> Job | None:
        """The newest running job of these kinds, else the newest one (what a reloaded page re-attaches to)."""
        jobs = self.list(kinds)
        return next((j for j in jobs if self.state(j) == "running"), jobs[0] if jobs else None)

    # ------------------------------------------------------------ where a job stands
    def state(self, job: Job) -> str:
        """running | finished | failed | stopped."""
        child = self.children.get(job.id)
        if child is not None:
            code = child.poll()
            if code is None:
                return "running"
            if job.returncode is None:
                job.returncode = code
                self._save(job)
        elif job.returncode is None and _alive(job.pid, job.proc_start):
            return "running"  # started by an earlier UI server: not our child, but still there
        if job.returncode is not None:
            return "finished" if job.returncode == 0 else "stopped" if job.returncode in (130, -15, -9) else "failed"
        tail = self.log_tail(job, 2000)
        return next((state for word, state in ENDINGS if word in tail), "finished")

    def log_tail(self, job: Job, chars: int = 6000) -> str:
        """The end of the log, progress-bar redraws reduced to the latest one."""
        try:
            with open(job.log, "rb") as handle:
                handle.seek(0, os.SEEK_END)
                size = handle.tell()
                handle.seek(max(0, size - chars * 4))
                text = handle.read().decode("utf-8", errors="replace")
        except OSError:
            return ""
        lines = [line.split("\r")[-1] for line in text.split("\n")]
        return "\n".join(line for line in lines if line.strip())[-chars:]

    def progress(self, job: Job) -> dict:
        """step / total / elapsed / ETA from the last progress bar; for a recipe also the step it is on."""
        text = self.log_tail(job, 20000)
        found: dict = {"state": self.state(job), "elapsed_s": round(time.time() - job.started_at, 1)}
        if job.kind == "run":
            steps = RECIPE_STEP.findall(text) or RECIPE_STEP.findall(self.log_tail(job, 400000))
            if steps:
                index, total, name, kind, action, output = steps[-1]
                found["recipe"] = {"step": int(index), "steps": int(total), "name": name, "kind": kind,
                                   "action": action, "output": output}
                text = text[text.rfind(f"== step {index} of"):]  # the bar of the current step only
        bars = BAR.findall(text)
        if bars:
            step, total, elapsed, eta = bars[-1]
            found.update(step=int(step), total=int(total), bar_elapsed=elapsed, eta=eta)
        return found

    def metrics_file(self, job: Job) -> Path | None:
        """The metrics.jsonl a job's training writes (a recipe: its current or last train step's)."""
        if job.kind == "train" and job.output:
            return Path(job.output) / "metrics.jsonl"
        if job.kind == "run":
            recipe = self.progress(job).get("recipe")
            if recipe and recipe["kind"] == "train":
                output = Path(recipe["output"])
                return output / "metrics.jsonl" if output.is_absolute() else self.ws.root / output / "metrics.jsonl"
        return None


def _proc_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, proc_start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    now = _proc_start(pid)
    if now is None or proc_start is None:
        return True
    if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
        return False  # a zombie: ended, waiting for a parent that is gone
    return now == proc_start
