"""Checkpoints that a crash can never corrupt, and resuming from them.

A checkpoint is written to `checkpoints/.partial-step-N/` and renamed to `checkpoints/step-N/` only when
complete (rename is atomic on one filesystem), so `resume: auto` never picks a half-written one. It holds
the trainable weights, optimizer and scheduler state, every process's RNG state and the loop's position,
which is enough to reach the same final weights as an uninterrupted run. Under FSDP and DeepSpeed the weights
and optimizer state are sharded: each process writes its own shards through accelerate's `save_state` (in
`sharded/`), and reading them back needs the same number of processes and the same strategy. torch is imported inside the functions
that need it, so the CLI can look at an output directory's checkpoints before torch loads.
"""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

STEP_DIR = re.compile(r"^step-(\d+)$")
SHARDED = "sharded"  # accelerate's save_state of a sharded run, inside a checkpoint


def trainable_state(model, names: set[str]) -> dict:
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if n in names}


def rng_state() -> dict:
    import numpy as np
    import torch

    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(root: Path, step: int, *, model, names: set[str], optimizer, scheduler, loop_state: dict,
                    rank: int = 0, is_main: bool = True, keep: int = 2, barrier=lambda: None,
                    sharded_by=None) -> Path:
    """Write checkpoint `step` atomically and prune all but the newest `keep`. `sharded_by`: the Accelerator of a
    sharded run (FSDP, DeepSpeed), whose save_state writes every process's shards of weights and optimizer."""
    import torch
    from safetensors.torch import save_file

    final = root / f"step-{step}"
    partial = root / f".partial-step-{step}"
    if is_main:
        shutil.rmtree(partial, ignore_errors=True)
        partial.mkdir(parents=True)
    barrier()
    torch.save(rng_state(), partial / f"rng-{rank}.pt")
    if sharded_by is not None:
        sharded_by.save_state(str(partial / SHARDED), safe_serialization=True)
    if is_main:
        if sharded_by is None:
            save_file(trainable_state(model, names), str(partial / "trainable.safetensors"))
            torch.save(optimizer.state_dict(), partial / "optimizer.pt")
        torch.save(scheduler.state_dict(), partial / "scheduler.pt")
        (partial / "trainer_state.json").write_text(json.dumps({**loop_state, "step": step}, indent=1))
    barrier()
    if is_main:
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
        for old in list_checkpoints(root)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a `.partial-*` directory is never listed)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_DIR.match(p.name))
             and (p / "trainer_state.json").is_file()]
    return [p for _, p in sorted(found)]


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "auto":
        found = list_checkpoints(output_dir / "checkpoints")
        return found[-1] if found else None
    path = Path(resume)
    if not (path / "trainer_state.json").is_file():
        from .errors import ConfigError

        raise ConfigError(f"resume: {resume} is not a complete checkpoint (no trainer_state.json)")
    return path


def is_sharded(path: Path) -> bool:
    return (path / SHARDED).is_dir()


def load_checkpoint(path: Path, *, model, optimizer, scheduler, rank: int = 0, sharded_by=None) -> dict:
    """Restore what save_checkpoint wrote; a sharded checkpoint through `sharded_by.load_state` (every process)."""
    import torch
    from safetensors.torch import load_file

    if is_sharded(path):
        sharded_by.load_state(str(path / SHARDED))
        return _restore_rest(path, scheduler, rank)
    weights = load_file(str(path / "trainable.safetensors"))
    missing = set(weights) - {n for n, _ in model.named_parameters()}
    if missing:
        from .errors import ConfigError

        raise ConfigError(f"checkpoint {path} does not match this model (unknown weights: {sorted(missing)[:3]})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    return _restore_rest(path, scheduler, rank)


def _restore_rest(path: Path, scheduler, rank: int) -> dict:
    import torch

    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng_file = path / f"rng-{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return json.loads((path / "trainer_state.json").read_text())
