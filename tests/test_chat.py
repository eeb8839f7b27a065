"""`posttrain chat` in a subprocess, typed at through stdin: multi-turn history, /reset, /exit, end of input."""
from __future__ import annotations

import subprocess
import sys

from posttrain.chat import HELP
from posttrain.engine import Engine, SamplingParams
from test_engine import varied_model  # noqa: F401 - the fixture

SYSTEM = "Be brief."


def chat(model, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "chat", "--model", str(model), "--system", SYSTEM,
                           "--temperature", "0", "--max-new-tokens", "8", *extra], input=stdin, text=True,
                          capture_output=True, timeout=120)


def test_chat_keeps_the_history_resets_and_exits(varied_model):  # noqa: F811
    result = chat(varied_model, "The kitchen opens\nTwo plus\n/reset\nThe kitchen opens\n/exit\nnever read\n")
    assert result.returncode == 0, result.stderr

    engine = Engine.load(varied_model)
    params = SamplingParams(max_new_tokens=8, temperature=0)

    def answer(messages):
        return engine.chat([messages], params)[0].text

    system = {"role": "system", "content": SYSTEM}
    first = answer([system, {"role": "user", "content": "The kitchen opens"}])
    second = answer([system, {"role": "user", "content": "The kitchen opens"}, {"role": "assistant", "content": first},
                     {"role": "user", "content": "Two plus"}])
    assert second != answer([system, {"role": "user", "content": "Two plus"}])  # the history mattered
    assert result.stdout == (f"{HELP}\nyou> assistant> {first}\nyou> assistant> {second}\n"
                             f"you> (conversation reset)\nyou> assistant> {first}\nyou> ")


def test_chat_ends_at_end_of_input_and_bad_adapter_is_one_line(varied_model, tmp_path):  # noqa: F811
    result = chat(varied_model, "hello\n")
    assert result.returncode == 0 and result.stdout.endswith("you> \n")
    bad = chat(varied_model, "", "--adapter", str(tmp_path))
    assert bad.returncode == 2 and "not a LoRA adapter directory" in bad.stderr and "Traceback" not in bad.stderr
