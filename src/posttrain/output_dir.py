"""One run at a time in an output directory, and nothing an earlier run left there replaced by accident.

`locked(out_dir)` holds an exclusive lock on OUT/.posttrain.lock for the whole run; the file names the
holder (pid, host, start, command), so a second run is refused with the running one's name. The kernel
releases the lock when its process dies, even by SIGKILL: a lock file left by a dead run is detected (it is
not empty but nobody holds it) and taken over. `check_previous_run` refuses to replace a finished model or
an unfinished run's checkpoints unless `overwrite_output_dir` is set.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

from . import checkpoint as ckpt
from .errors import ConfigError

log = logging.getLogger("posttrain")

LOCK = ".posttrain.lock"
MODEL_FILES = ("model.safetensors", "adapter_model.safetensors", "model.safetensors.index.json")


def lock(out_dir: Path):
    """The lock for this process: only the main process of a distributed run takes it."""
    return locked(out_dir) if int(os.environ.get("RANK", "0")) == 0 else nullcontext()


@contextmanager
def locked(out_dir: Path):
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / LOCK
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "a process that has not written its name yet"
        handle.close()
        raise ConfigError(f"output_dir {out_dir} is in use by another run ({holder}); wait for it to finish or "
                          f"choose another output_dir") from None  # (the same words as check_unlocked)
    handle.seek(0)
    stale = handle.read().strip()
    if stale:
        log.warning("output_dir %s: took over the lock of a run that ended without releasing it (%s)", out_dir,
                    stale)
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}: "
                 f"{' '.join(sys.argv)}\n")
    handle.flush()
    try:
        yield
    finally:
        handle.seek(0)
        handle.truncate()  # empty: released cleanly (the file stays, so no second process can lock another)
        if created and [p.name for p in out_dir.iterdir()] == [LOCK]:  # a run that failed before writing
            path.unlink()
            out_dir.rmdir()
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def check_unlocked(out_dir: Path) -> None:
    """The refusal `locked` would give, without taking the lock (the CLI answers before torch loads)."""
    path = out_dir / LOCK
    if not path.is_file():
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise ConfigError(f"output_dir {out_dir} is in use by another run ({handle.read().strip()}); wait "
                              f"for it to finish or choose another output_dir") from None
        fcntl.flock(handle, fcntl.LOCK_UN)


def plan(out_dir: Path, resume: str | None, overwrite: bool) -> tuple[dict | None, Path | None]:
    """What a run into out_dir does: (the finished run's summary, None) when `resume: auto` finds a finished
    run (nothing to do); else (None, the checkpoint to resume from, or None for a new run). A new run that
    would replace an earlier run's output without `overwrite` is a ConfigError."""
    finished = finished_summary(out_dir)
    if resume == "auto" and finished is not None:
        if not overwrite:
            return finished, None
        resume = None  # --overwrite: a finished run is replaced, not continued
    resume_from = ckpt.find_resume_checkpoint(resume, out_dir)
    if resume_from is None:
        check_previous_run(out_dir, overwrite)
    return None, resume_from


def finished_summary(out_dir: Path) -> dict | None:
    """summary.json of a finished run (it is written last), or None."""
    try:
        return json.loads((out_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None


def describe_finished(out_dir: Path, summary: dict) -> str:
    return (f"{out_dir} already holds a finished {summary.get('stage', '')} run ({summary.get('steps', '?')} steps, "
            f"finished {summary.get('finished_at', '?')})")


def check_previous_run(out_dir: Path, overwrite: bool) -> None:
    """A new run (not a resume) would remove what an earlier run left: refuse unless `overwrite`."""
    if overwrite or not out_dir.is_dir():
        return
    summary = finished_summary(out_dir)
    if summary is not None:
        raise ConfigError(f"{describe_finished(out_dir, summary)}: add --overwrite (overwrite_output_dir: true) "
                          f"to replace it, or choose another output_dir")
    found = ckpt.list_checkpoints(out_dir / "checkpoints")
    if found:
        raise ConfigError(f"{out_dir} holds checkpoints of an unfinished run (newest: {found[-1].name}): add "
                          f"resume=auto to continue it, or --overwrite to start again")
    model = [name for name in MODEL_FILES if (out_dir / name).is_file()]
    if model:
        raise ConfigError(f"{out_dir} already holds a model ({model[0]}): add --overwrite to replace it, or "
                          f"choose another output_dir")
