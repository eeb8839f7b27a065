"""A realistic size on a CPU: a Qwen2.5-0.5B-shaped model (494M parameters, random weights, the real 151,936-row
vocabulary, tied head) trained for a few steps of SFT, DPO and GRPO by posttrain and by TRL, one after the other
in one run: seconds per optimizer step and peak RSS. Then whole `rm` and `dpo` jobs at a small size (start-up,
data preparation, training and saving included), posttrain's defaults against TRL.

    python benchmarks/scale.py                       # everything (about 15 minutes on a 2-core CPU)
    python benchmarks/scale.py --stages sft --steps 3
    python benchmarks/scale.py --stages whole        # only the small whole-job comparison

Each measurement is one of the per-stage benchmarks (`sft.py`, `dpo.py`, `grpo.py`, `rm.py`), run as a child
process with `--size qwen2.5-0.5b` (see their docstrings for what is held identical on both sides: data, token
ids, batch order, optimiser); this script gathers their results into one table. fp32 weights and optimizer
state on both sides (bf16 autocast is emulated on CPUs without AVX512-BF16 / AMX); the torch thread count is
the children's default (2 on this machine), the same on both sides.

* GRPO on the random 0.5B model samples ids from all 151,936 rows, most of which the small tokenizer does not
  have: completions run to the token cap on both sides (the same work for both);
* seconds per step: wall time of the optimizer steps after the first (`--warmup 1`), divided by their number
  (GRPO: generation, scoring and the update together); CPU-seconds per step: the child's CPU time (all its
  threads) over the same steps, the fair measure when other processes share the machine;
* peak RSS: `ru_maxrss` of the child at exit (imports, data, model, optimizer state, training, saving);
* whole jobs: the child processes' wall time from start to exit.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SIZE = "qwen2.5-0.5b"  # --quick: "tiny"


def run(script: str, args: list[str], work: Path, reuse: bool = False) -> dict:
    """`python benchmarks/SCRIPT ARGS --workdir WORK`; its results.json (with `reuse`, an earlier one if there)."""
    if reuse and (work / "results.json").is_file():
        return json.loads((work / "results.json").read_text())
    work.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, str(HERE / script), *args, "--workdir", str(work)]
    print("$", " ".join(command[1:]), flush=True)
    started = time.time()
    result = subprocess.run(command, capture_output=True, text=True)
    (work / "stdout.txt").write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        raise SystemExit(f"{script} failed ({result.returncode}); see {work / 'stdout.txt'}:\n{result.stderr[-3000:]}")
    print(f"  done in {time.time() - started:.0f}s", flush=True)
    return json.loads((work / "results.json").read_text())


def share_model(work: Path, stage_work: Path, size: str) -> None:
    """The 2 GB model is written once (by the first stage) and linked into the others' work directories."""
    for built in work.glob(f"*/model-{size}-*"):
        target = stage_work / built.name
        if built.parent != stage_work and not target.exists():
            stage_work.mkdir(parents=True, exist_ok=True)
            target.symlink_to(built.resolve(), target_is_directory=True)


def seconds_per_step(r: dict, cpu: bool = False) -> float:
    """Wall seconds (or the process's CPU seconds, all threads: robust to other load) per timed step."""
    return r["timed_cpu_s" if cpu else "timed_s"] / max(r["steps"] - r["warmup_steps"], 1)


def scale_rows(args, work: Path) -> list[str]:
    # a real shape has its own vocabulary (the flag only names the model's directory, shared by the stages);
    # the tiny smoke-test model keeps its BPE size for GRPO, whose sampled ids must decode
    rows_flag = ["--embedding-rows", "0" if args.quick else "151936"]
    common = ["--size", args.size, "--steps", str(args.steps), "--warmup", "1", "--precision", "fp32",
              "--max-length", str(args.max_length)] + ([] if args.quick else rows_flag)
    plans = {
        "sft": ("sft.py", common + ["--batch-size", str(args.batch_size)], ("posttrain", "trl")),
        "dpo": ("dpo.py", common + ["--batch-size", str(args.batch_size),
                                    "--variants", "posttrain-prefix,posttrain-precompute,trl-precompute"],
                ("posttrain-prefix", "posttrain-precompute", "trl-precompute")),
        "grpo": ("grpo.py", common + ["--batch-size", str(args.grpo_prompts), "--num-generations", "4",
                                      "--max-new-tokens", str(args.max_new_tokens), "--threads", "0"]
                 + (rows_flag if args.quick else []), ("posttrain", "trl")),
    }
    labels = {"posttrain": "posttrain", "trl": "TRL", "posttrain-prefix": "posttrain (default: prefix sharing)",
              "posttrain-precompute": "posttrain (prefix sharing off)", "trl-precompute": "TRL (precompute ref)"}
    rows = ["| stage | run | seconds per step (wall) | CPU-seconds per step | peak RSS (GiB) | speed vs TRL "
            "(wall / CPU) | memory vs TRL |", "|---|---|---:|---:|---:|---:|---:|"]
    for stage in [s for s in ("sft", "dpo", "grpo") if s in args.stages]:
        script, flags, names = plans[stage]
        stage_work = work / stage
        share_model(work, stage_work, args.size)
        results = run(script, flags, stage_work, args.reuse)["results"]["fp32"]
        trl = results[names[-1]]
        for name in names:
            r = results[name]
            wall, cpu = (seconds_per_step(trl, c) / seconds_per_step(r, c) for c in (False, True))
            cells = [stage, labels[name], f"{seconds_per_step(r):.1f}", f"{seconds_per_step(r, True):.1f}",
                     f"{r['peak_rss_mb'] / 1024:.2f}"]
            cells += ["", ""] if name == names[-1] else [f"{wall:.2f}x / **{cpu:.2f}x**",
                                                          f"**{r['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x**"]
            rows.append("| " + " | ".join(cells) + " |")
    return rows


def whole_job_rows(args, work: Path) -> list[str]:
    small = ["--size", "small", "--embedding-rows", "4096", "--steps", str(args.whole_steps), "--batch-size", "8",
             "--precision", "fp32", "--repeats", str(args.repeats)]
    rows = ["| job | posttrain wall s (CPU s) | TRL wall s (CPU s) | TRL / posttrain, wall (CPU) | "
            "posttrain peak RSS / TRL's |", "|---|---:|---:|---:|---:|"]
    for stage, script, ours, theirs in (("rm", "rm.py", "posttrain-prefix", "trl"),
                                        ("dpo", "dpo.py", "posttrain-prefix", "trl-precompute")):
        results = run(script, small + ["--variants", f"{ours},{theirs}"], work / f"whole-{stage}",
                      args.reuse)["results"]["fp32"]
        p, t = results[ours], results[theirs]
        cpu = {side: r.get("process_cpu_s", float("nan")) for side, r in (("p", p), ("t", t))}
        rows.append(f"| {stage} ({args.whole_steps} steps of 8 pairs) | {p['process_s']:.1f} ({cpu['p']:.1f}) | "
                    f"{t['process_s']:.1f} ({cpu['t']:.1f}) | {t['process_s'] / p['process_s']:.2f}x "
                    f"(**{cpu['t'] / cpu['p']:.2f}x**) | {p['peak_rss_mb'] / t['peak_rss_mb']:.2f}x |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", default="sft,dpo,grpo,whole", help="comma-separated: sft, dpo, grpo, whole")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per 0.5B run (the first is not timed)")
    parser.add_argument("--batch-size", type=int, default=4, help="sft: sequences, dpo: pairs per step")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--grpo-prompts", type=int, default=2, help="prompts per GRPO step (x 4 completions)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="GRPO completion length cap")
    parser.add_argument("--whole-steps", type=int, default=20, help="steps of the small whole jobs")
    parser.add_argument("--repeats", type=int, default=2, help="whole jobs: interleaved runs, the fastest kept")
    parser.add_argument("--workdir", help="keep models, data, logs and results here (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="the tiny model, 2 steps, small jobs: a smoke test")
    parser.add_argument("--reuse", action="store_true", help="take the results a stage left in --workdir, if any")
    args = parser.parse_args()
    args.size = "tiny" if args.quick else SIZE
    if args.quick:
        args.steps, args.whole_steps, args.repeats, args.max_new_tokens = 2, 3, 1, 8
    args.stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        lines = [f"Command: `python benchmarks/scale.py {' '.join(sys.argv[1:])}`", ""]
        if set(args.stages) & {"sft", "dpo", "grpo"}:
            lines += [f"{args.size}-shaped model, fp32, {args.steps} steps (first not timed), batch {args.batch_size}, "
                      f"max_length {args.max_length}; GRPO {args.grpo_prompts} prompts x 4, {args.max_new_tokens} "
                      f"new tokens.", "", *scale_rows(args, work), ""]
        if "whole" in args.stages:
            lines += [f"Whole jobs, `small` model (4096 embedding rows), best of {args.repeats}:", "",
                      *whole_job_rows(args, work)]
        table = "\n".join(lines)
        print("\n" + table)
        (work / "scale.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
