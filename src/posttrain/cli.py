"""`posttrain <command>`: parses arguments and calls library functions; nothing else lives here."""
from __future__ import annotations

import argparse
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

from .errors import PosttrainError
from .rag.commands import add_rag_arguments, add_rag_commands, rag_augmenter


def _train(args) -> None:
    from .config import load_config
    from .hub import resolve_model_path
    from .output_dir import check_unlocked, plan

    config = load_config(args.config, args.overrides + (["overwrite_output_dir=true"] if args.overwrite else []))
    # config, model-path and output_dir problems are answered before torch loads (run_training checks the
    # output_dir again, holding its lock)
    resolve_model_path(config.model)
    check_unlocked(Path(config.output_dir))
    finished, _ = plan(Path(config.output_dir), config.resume, config.overwrite_output_dir)
    if finished is not None:
        summary = {**finished, "already_finished": True}
    else:
        from .train import run_training

        try:
            summary = run_training(config)
        except KeyboardInterrupt:
            raise KeyboardInterrupt(_resume_hint(args, config)) from None
    if summary.get("already_finished"):
        print(f"{config.output_dir} already holds a finished run ({summary.get('steps')} steps, finished "
              f"{summary.get('finished_at')}): nothing to do; add --overwrite to train it again")
        return
    final = summary.get("final_eval") or {}
    shown = ", ".join(f"{k}={v:.4g}" for k, v in final.items() if isinstance(v, float))
    print(f"done: {summary.get('steps')} steps -> {config.output_dir}"
          + (f" ({shown})" if shown else ""))


def _resume_hint(args, config) -> str:
    """Where an interrupted training stands and the command that continues it."""
    from .checkpoint import list_checkpoints

    found = list_checkpoints(Path(config.output_dir) / "checkpoints")
    if not found:
        return (f"no checkpoint in {config.output_dir} yet (train.save_steps: {config.train.save_steps}), so a "
                f"rerun starts from the beginning; set train.save_steps to be able to resume")
    overrides = [o for o in args.overrides if not o.startswith("resume=")]
    command = shlex.join(["posttrain", "train", args.config, *overrides, "resume=auto"])
    return f"the last checkpoint is {found[-1]}; continue from it with: {command}"


def _inspect(args) -> None:
    from .data.inspect import inspect_data

    print(inspect_data(args.file, model=args.model, stage=args.stage, max_length=args.max_length,
                       dataset_info=args.dataset_info, chat_template=args.chat_template))


def _pairs(args) -> None:
    from .data.preference import pairs_command

    print(pairs_command(args.file, args.out))


def _score(args) -> None:
    from .score import score_file

    result = score_file(args.model, args.data, args.out, max_length=args.max_length, batch_size=args.batch_size,
                        device=args.device, dtype=args.dtype)
    print(f"scored {result['rows']} rows ({result['kind']}; reward offset {result['offset']:+.4f}) -> {args.out}"
          + (f"; {result['unscored']} rows could not be scored (null)" if result["unscored"] else ""))


def _generate(args) -> None:
    from .engine import SamplingParams
    from .generate import generate_file

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, stop=args.stop or [], seed=args.seed, n=args.n)
    counts = generate_file(args.model, args.prompts, args.out, params, adapter=args.adapter,
                           batch_size=args.batch_size, chat_template=args.chat_template, device=args.device,
                           dtype=args.dtype)
    print(f"generated {counts['responses']} responses for {counts['prompts']} prompts "
          f"({counts['length']} cut at --max-new-tokens) -> {args.out}")


def _run(args) -> None:
    from .recipe import format_results, run_recipe

    try:
        results = run_recipe(args.recipe, from_step=args.from_step, out=args.out)
    except KeyboardInterrupt:
        again = shlex.join(["posttrain", "run", args.recipe] + (["--out", args.out] if args.out else []))
        raise KeyboardInterrupt(f"`{again}` continues after the last completed step") from None
    ran = sum(not r["skipped"] for r in results.values())
    print(f"{ran} of {len(results)} steps ran:\n{format_results(results)}")


def _eval(args) -> None:
    from .evaluate import evaluate, format_result, write_result

    result = evaluate(args.model, adapter=args.adapter, tasks=args.tasks, data=args.data, pairs=args.pairs,
                      reward_model=args.reward_model, reference=args.reference, max_new_tokens=args.max_new_tokens,
                      n_samples=args.n_samples, batch_size=args.batch_size, max_length=args.max_length,
                      checker=args.checker, chat_template=args.chat_template, generations_out=args.generations,
                      rag=rag_augmenter(args),
                      samples=args.samples, temperature=args.temperature, seed=args.seed, quantize=args.quantize,
                      device=args.device, dtype=args.dtype)
    print(format_result(result))
    if args.out:
        print(f"-> {write_result(result, args.out)}")


def _serve(args) -> None:
    from .modeling import resolve_device, resolve_dtype
    from .serve import serve

    device = resolve_device(args.device)
    dtype = {"torch.bfloat16": "bfloat16", "torch.float16": "float16", "torch.float32": "float32"}[
        str(resolve_dtype(args.dtype, device))]
    serve(args.model, args.lora or [], host=args.host, port=args.port, api_key=args.api_key, device=device,
          chat_template=args.chat_template, dtype=dtype, max_rows=args.max_rows,
          max_request_bytes=args.max_request_bytes, cors=args.cors, backend=args.backend, rag=args.rag,
          rag_k=args.rag_k, rag_mode=args.rag_mode, rag_template=args.rag_template, quantize=args.quantize,
          allow_remote_images=args.allow_remote_images)


def _chat(args) -> None:
    from .chat import run_chat
    from .engine import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    run_chat(args.model, args.adapter, args.system, params, chat_template=args.chat_template, rag=args.rag,
             rag_k=args.rag_k, rag_mode=args.rag_mode, rag_template=args.rag_template, quantize=args.quantize,
             device=args.device, dtype=args.dtype)


def _init_model(args) -> None:
    from .init_model import init_model, read_corpus

    out = init_model(args.arch, args.size, read_corpus(args.tokenizer_corpus), args.out,
                     vocab_size=args.vocab_size, seed=args.seed)
    print(f"wrote a random {args.arch}/{args.size} model with its tokenizer to {out}")


def _export(args) -> None:
    from .export import export

    for line in export(args.model, args.out, adapter=args.adapter, format=args.format, quant=args.quant,
                       ollama=args.ollama, trust_remote_code=args.trust_remote_code):
        print(line)


def _demo(args) -> None:
    from .demo.run import run_demo

    try:
        run_demo(Path(args.out), quick=args.quick, frontier=args.frontier)
    except KeyboardInterrupt:
        again = shlex.join(["posttrain", "demo", *(["--quick"] if args.quick else []),
                            *(["--frontier"] if args.frontier else []), "--out", args.out])
        raise KeyboardInterrupt(f"`{again}` continues after the last completed step") from None


def _ui(args) -> None:
    from .ui import launch

    launch(args.workdir, host=args.host, port=args.port, auth=args.auth)


def _config_reference(args) -> None:
    from .config import reference_markdown

    text = reference_markdown()
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)


def _add_data_commands(sub) -> None:
    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("inspect", help="detected format, counts, token lengths, problems, a rendered example")
    p.add_argument("file")
    p.add_argument("--model", help="model/tokenizer directory for token statistics and rendering")
    p.add_argument("--stage", choices=["pt", "sft", "classify", "rm", "dpo", "kto"],
                   help="default: guessed from the format")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--dataset-info", help="LLaMA-Factory dataset_info.json (FILE is then a dataset name)")
    p.add_argument("--chat-template", help="Jinja template (inline or file); replaces the tokenizer's own")
    p.set_defaults(func=_inspect)

    p = data.add_parser("pairs", help="expand rankings (best to worst, ties allowed) into preference pairs")
    p.add_argument("file", help="rankings: rows {prompt, responses: [best, ..., worst], ranks?}")
    p.add_argument("--out", required=True, help="JSONL of {prompt, chosen, rejected}")
    p.set_defaults(func=_pairs)


def _add_placement(p) -> None:
    """--device and --dtype of a command that loads a model (modeling.resolve_device / resolve_dtype)."""
    p.add_argument("--device", default="auto", help="auto (a CUDA GPU, else Apple MPS, else the CPU), cuda, cuda:N, "
                                                    "mps or cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on a GPU that has it, fp16 on older GPUs and MPS, fp32 "
                                                   "on a CPU), bf16, fp16 or fp32")


class _Help(argparse.HelpFormatter):
    """--help lists each option's default; unlike argparse's ArgumentDefaultsHelpFormatter, not 'None'."""

    @staticmethod
    def _shows_default(action) -> bool:
        return bool(action.option_strings) and action.default is not None and action.default is not False \
            and action.default is not argparse.SUPPRESS

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if self._shows_default(action) and "default" not in text:
            text += (" " if text else "") + "(default: %(default)s)"
        return text

    def _format_action(self, action) -> str:
        if action.help is None and self._shows_default(action):
            action.help = "(default: %(default)s)"  # argparse leaves out the help of an option without one
        return super()._format_action(action)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return (f"posttrain {__version__} (torch {installed('torch')}, transformers "
            f"{installed('transformers')}, peft {installed('peft')})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description="Post-training for language models.",
                                     formatter_class=_Help)
    parser.add_argument("-v", "--verbose", action="store_true", help="show debug logging")
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser = _with_help(sub.add_parser)

    p = sub.add_parser("train", help="run the stage named by `stage:` in a YAML config")
    p.add_argument("config", metavar="CONFIG", help="YAML config file")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="optional overrides of config keys by dotted name, e.g. train.max_steps=6")
    p.add_argument("--overwrite", action="store_true",
                   help="replace what an earlier run left in output_dir (a finished model, or checkpoints)")
    p.set_defaults(func=_train)

    _add_data_commands(sub)
    add_rag_commands(sub)

    p = sub.add_parser("score", help="a reward per row from a reward model (stage rm)")
    p.add_argument("--model", required=True, help="reward model directory")
    p.add_argument("--data", required=True, help="preference pairs or chats (any supported format)")
    p.add_argument("--out", required=True, help="JSONL: each row with chosen_reward/rejected_reward or reward")
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=16)
    _add_placement(p)
    p.set_defaults(func=_score)

    p = sub.add_parser("generate", help="sample K responses per prompt (rankings rows for `data pairs`)")
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--adapter", help="LoRA adapter directory on top of --model")
    p.add_argument("--prompts", required=True, help="rows with `prompt` (string or messages) or `messages`")
    p.add_argument("--n", type=int, default=4, help="responses per prompt")
    p.add_argument("--out", required=True, help="JSONL of {prompt, responses, ..., finish_reasons, logprobs}")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=1.0, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: no top-k filtering")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", nargs="+", help="stop strings (cut from the text)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts decoded together (each x --n)")
    p.add_argument("--chat-template", help="Jinja template (inline or file); replaces the tokenizer's own")
    _add_placement(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (chat, completions, LoRA adapters by name)")
    p.add_argument("--model", required=True, help="model directory or hub id (also its served name)")
    p.add_argument("--lora", action="append", metavar="NAME=DIR", help="serve a LoRA adapter as model NAME")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", help="require `Authorization: Bearer KEY` on /v1 and the tokenizer routes")
    p.add_argument("--chat-template", help="Jinja template (inline or file); replaces the tokenizer's own")
    _add_placement(p)
    p.add_argument("--max-rows", type=int, default=64,
                   help="most sequences decoded together (continuous batching: requests join and leave at every "
                        "step; one request's prompts x n count too)")
    p.add_argument("--max-request-bytes", type=int, default=4 * 1024 * 1024, help="larger request bodies get a 413")
    p.add_argument("--allow-remote-images", action="store_true",
                   help="fetch http(s) image_url parts (a vision-language model; off: only data URLs are read)")
    p.add_argument("--cors", action="append", metavar="ORIGIN",
                   help="allow browser pages from ORIGIN (repeatable; * for any) to call the server")
    p.add_argument("--backend", choices=["engine", "vllm"], default="engine",
                   help="engine: posttrain's own; vllm: vLLM's OpenAI server (GPU, vLLM installed)")
    add_rag_arguments(p)
    p.add_argument("--quantize", choices=["int8"], help="int8: weight-only int8 linear layers (torchao), less memory")
    p.set_defaults(func=_serve)

    p = sub.add_parser("chat", help="a multi-turn chat in the terminal, streamed (/reset, /exit)")
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--adapter", help="LoRA adapter directory on top of --model")
    p.add_argument("--system", help="system prompt")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--chat-template", help="Jinja template (inline or file); replaces the tokenizer's own")
    add_rag_arguments(p)
    p.add_argument("--quantize", choices=["int8"], help="int8: weight-only int8 linear layers (torchao), less memory")
    _add_placement(p)
    p.set_defaults(func=_chat)

    p = sub.add_parser("run", help="run a multi-stage recipe (steps whose inputs are unchanged are skipped)")
    p.add_argument("recipe", help="recipe YAML: out, vars, steps")
    p.add_argument("--from", dest="from_step", metavar="STEP", help="rerun this step and every step after it")
    p.add_argument("--out", help="output root (default: the recipe's `out`, else runs/<recipe name>)")
    p.set_defaults(func=_run)

    p = sub.add_parser("eval", help="task accuracy, reward-model score and accuracy, KL to a reference, perplexity")
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--adapter", help="LoRA adapter directory on top of --model")
    p.add_argument("--tasks", help="held-out prompts with answers: rows {prompt (or messages), answer, kind}")
    p.add_argument("--data", help="text or chat file for perplexity (on the tokens training would train)")
    p.add_argument("--pairs", help="preference pairs for the reward model's pairwise accuracy")
    p.add_argument("--reward-model", help="reward model directory (stage rm): mean score of the answers")
    p.add_argument("--reference", help="reference model directory: KL(model || reference) on the answers")
    p.add_argument("--out", help="write the result as JSON to this file")
    p.add_argument("--generations", help="write each prompt's answer and scores as JSONL to this file")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--n-samples", type=int, help="evaluate only the first N task prompts")
    p.add_argument("--samples", type=int, default=0,
                   help="also sample K answers per task prompt: sampled_accuracy / sampled_reward")
    p.add_argument("--temperature", type=float, default=1.0, help="for --samples")
    p.add_argument("--seed", type=int, default=0, help="for --samples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-length", type=int, default=1024)
    p.add_argument("--checker", help="'module:function' or 'file.py:function' (answer, completion) -> score; "
                                     "default: exact match of the answer (first line, 'Answer:' and edge "
                                     "punctuation ignored)")
    p.add_argument("--chat-template", help="Jinja template (inline or file); replaces the tokenizer's own")
    p.add_argument("--quantize", choices=["int8"], help="int8: weight-only int8 linear layers (torchao), less memory")
    add_rag_arguments(p)
    _add_placement(p)
    p.set_defaults(func=_eval)

    p = sub.add_parser("init-model", help="train a BPE tokenizer and write a randomly initialised model")
    p.add_argument("--arch", choices=["qwen2", "llama", "gpt2", "qwen2-vl", "llava"], default="qwen2",
                   help="qwen2-vl, llava: a vision-language model (small vision tower, image processor, processor "
                        "config), loadable with AutoModelForImageTextToText and AutoProcessor")
    p.add_argument("--size", choices=["tiny", "mini", "small", "base"], default="tiny")
    p.add_argument("--tokenizer-corpus", nargs="+", required=True, help="text file(s) to train the tokenizer on")
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    p.set_defaults(func=_init_model)

    p = sub.add_parser("export", help="merged HF model, GGUF (llama.cpp / Ollama) or a vLLM-ready LoRA adapter")
    p.add_argument("--model", required=True, help="base model directory or hub id")
    p.add_argument("--adapter", help="LoRA adapter directory (merged into --model for hf and gguf)")
    p.add_argument("--out", required=True, help="directory (hf, vllm) or FILE.gguf (gguf)")
    p.add_argument("--format", default="hf", help="hf (merged safetensors), gguf, vllm (checked LoRA adapter)")
    p.add_argument("--quant", default="f16", help="gguf tensor type: f16, bf16, q8_0, q4_0")
    p.add_argument("--ollama", action="store_true", help="with --format gguf: also write an Ollama Modelfile")
    p.add_argument("--trust-remote-code", action="store_true")
    p.set_defaults(func=_export)

    p = sub.add_parser("demo", help="the embedded default: tiny model, generated data, the pipeline end to end")
    p.add_argument("--quick", action="store_true", help="a smaller, faster run (used by the tests)")
    p.add_argument("--frontier", action="store_true", help="also DPO at 3 betas and PPO at 3 KL coefficients: the "
                                                           "gold score against KL (reuses a finished run's steps)")
    p.add_argument("--out", default="demo-out")
    p.set_defaults(func=_demo)

    p = sub.add_parser("ui", help="the web UI: train, watch, compare runs, chat, rank answers into pairs, evaluate, "
                                  "export (needs posttrain[ui])")
    p.add_argument("--workdir", default=".", help="the folder the UI works in: every path it reads or writes is "
                                                  "inside it")
    p.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to accept other machines (then use --auth)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--auth", metavar="USER:PASS", help="ask for this user name and password")
    p.set_defaults(func=_ui)

    p = sub.add_parser("config-reference", help="print the configuration reference (Markdown)")
    p.add_argument("--out", help="write it to this file instead")
    p.set_defaults(func=_config_reference)
    return parser


def _with_help(add_parser):
    """Every sub-command (and its own sub-commands) gets the formatter that shows defaults."""
    def add(*args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        parser = add_parser(*args, **kwargs)
        original = parser.add_subparsers

        def add_subparsers(**options):
            group = original(**options)
            group.add_parser = _with_help(group.add_parser)
            return group

        parser.add_subparsers = add_subparsers
        return parser
    return add


# third-party log lines that tell a user nothing (said in our words where it matters: modeling.py states a
# new task head once; the rest is torchao failing to load GPU kernels on a CPU machine, torch's deprecation
# notes about torchao's enums, and, when installed, DeepSpeed saying on every CPU run that it found no GPU
# and bitsandbytes that an optional CPU kernel package is missing)
QUIET = {"httpx": logging.WARNING, "urllib3": logging.WARNING, "datasets": logging.WARNING,
         "transformers": logging.WARNING, "accelerate": logging.WARNING, "peft": logging.WARNING,
         "filelock": logging.WARNING, "huggingface_hub": logging.ERROR, "torchao": logging.ERROR,
         "torch.utils._pytree": logging.ERROR, "bitsandbytes": logging.ERROR}


MODEL_COMMANDS = ("score", "generate", "serve", "chat", "eval", "export")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="posttrain: %(message)s",
                        stream=sys.stderr)
    for noisy, level in QUIET.items():
        logging.getLogger(noisy).setLevel(level)
    logging.getLogger("DeepSpeed").addFilter(lambda record: "unable to detect it" not in record.getMessage())
    warnings.filterwarnings("ignore", r"`(is_gradient_checkpointing|gradient_checkpointing_enable)` is deprecated",
                            FutureWarning)  # transformers 5 about names peft and we still call; nothing to do
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers reads it too, when it is imported
    try:
        if args.command in MODEL_COMMANDS:  # a missing directory fails before torch and transformers load
            from .hub import resolve_model_path

            resolve_model_path(args.model)
        if getattr(args, "device", None) is not None:  # a device or dtype the machine lacks, before any file is read
            from .modeling import resolve_device, resolve_dtype

            resolve_dtype(args.dtype, resolve_device(args.device))
        args.func(args)
    except PosttrainError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `posttrain data inspect f | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt as exc:
        # on a line of its own: a progress bar may have been drawn without a newline
        print(f"\ninterrupted: {exc}" if str(exc) else "\ninterrupted", file=sys.stderr)
        return 130
    return 0


def finish(code: int) -> None:
    """Exit with `code` once a command is done, without the interpreter's module teardown: freeing every
    module of torch and transformers one by one takes about 0.8 s at the end of each command, for nothing.
    Everything a normal exit does that matters still happens first: the exit handlers (logging's flush,
    temporary directories, torch.distributed) run and the standard streams are flushed. A command that left a
    non-daemon thread running exits the normal way, which waits for it."""
    import atexit
    import threading

    others = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon]
    if others:
        sys.exit(code)
    atexit._run_exitfuncs()  # what Py_Finalize runs first; the module teardown after it is what is skipped
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it anyway
            pass
    os._exit(code)


def entry() -> None:
    """The `posttrain` command (and `python -m posttrain.cli`)."""
    finish(main())


if __name__ == "__main__":
    entry()
