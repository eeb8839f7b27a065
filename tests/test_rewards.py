"""Reward sources: built-ins, callables, weighting, bad outputs, a real reward model, a real HTTP endpoint."""
from __future__ import annotations

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from posttrain.errors import ConfigError, DataError
from posttrain.rl.rewards import BUILTINS, RewardSource, build_sources, extract_code, load_callable, score


def run(spec: dict, completions: list[str], prompts: list[str] | None = None, **columns):
    (source,) = build_sources([spec])
    return source.fn(prompts or [""] * len(completions), completions, **columns)


# --------------------------------------------------------------------------- built-ins

def test_answer_match_exact_and_normalized():
    completions = ["42", "The Answer:  42.", " 42 ", "41"]
    answers = ["42", "the answer 42", "42", "42"]
    assert run({"builtin": "answer_match"}, completions, answer=answers) == [1.0, 0.0, 1.0, 0.0]
    assert run({"builtin": "answer_match", "normalize": True}, completions, answer=answers) == [1.0, 1.0, 1.0, 0.0]
    assert run({"builtin": "answer_match", "column": "gold"}, ["7"], gold=[7]) == [1.0]
    with pytest.raises(ConfigError, match="column 'answer'"):
        run({"builtin": "answer_match"}, ["7"], gold=[7])


def test_regex_length_json():
    assert run({"builtin": "regex", "pattern": r"<answer>\d+</answer>"},
               ["so <answer>12</answer>", "<answer>x</answer>"]) == [1.0, 0.0]
    assert run({"builtin": "length", "target": 10}, ["a" * 10, "a" * 5, "a" * 15, "a" * 30, ""]) == \
        [1.0, 0.5, 0.5, 0.0, 0.0]
    assert run({"builtin": "length", "target": 2, "unit": "words"}, ["one two", "one"]) == [1.0, 0.5]
    assert run({"builtin": "json_valid"}, ['{"a": [1, 2]}', " 3 ", "{'a': 1}", "null", "{"]) == \
        [1.0, 1.0, 0.0, 1.0, 0.0]


def test_builtin_options_are_checked():
    with pytest.raises(ConfigError, match="unknown reward builtin"):
        build_sources([{"builtin": "nope"}])
    with pytest.raises(ConfigError, match="unknown: \\['patern'\\]"):
        build_sources([{"builtin": "regex", "patern": "x"}])
    with pytest.raises(ConfigError, match="missing: \\['pattern'\\]"):
        build_sources([{"builtin": "regex"}])
    with pytest.raises(ConfigError, match="exactly one of"):
        build_sources([{"builtin": "regex", "http": "http://x"}])
    assert set(BUILTINS) == {"answer_match", "regex", "length", "json_valid", "python_tests"}


def test_python_tests_runs_code_in_a_subprocess():
    tests = "assert add(2, 3) == 5\nassert add(-1, 1) == 0\n"
    completions = [
        "Here it is:\n```python\ndef add(a, b):\n    return a + b\n```\nDone.",  # fenced, passes
        "def add(a, b):\n    return a - b\n",                                     # wrong answer
        "def add(a, b):\n    while True:\n        pass\n",                        # runs past the timeout
        "syntax error here(",                                                    # does not compile
    ]
    values = run({"builtin": "python_tests", "timeout": 2}, completions, tests=[tests] * 4)
    assert values == [1.0, 0.0, 0.0, 0.0]


def test_python_tests_has_no_network_and_a_fresh_directory(tmp_path):
    import socket
    server = socket.socket()  # a real listener the program would reach if sockets worked
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        reach = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n"
                 "    reached = True\nexcept OSError:\n    reached = False\n")
        isolated = "import os\nassert os.listdir('.') == ['program.py'], os.listdir('.')\nopen('x', 'w').write('1')\n"
        values = run({"builtin": "python_tests"}, [reach, isolated, isolated],
                     tests=["assert not reached", "", ""])
        assert values == [1.0, 1.0, 1.0]  # the third one ran in a new directory, not the second's
        assert run({"builtin": "python_tests"}, [reach], tests=["assert reached"]) == [0.0]
    finally:
        server.close()


def test_extract_code_joins_fenced_blocks():
    assert extract_code("a\n```python\nx = 1\n```\nb\n```py\ny = 2\n```") == "x = 1\n\n\ny = 2\n"
    assert extract_code("x = 1") == "x = 1"


# --------------------------------------------------------------------------- callables and combination

def test_load_callable_from_module_and_file(tmp_path):
    assert load_callable("json:dumps") is json.dumps
    file = tmp_path / "my_rewards.py"
    file.write_text("def shout(prompts, completions, **columns):\n    return [float(c.isupper()) for c in completions]\n")
    fn = load_callable(f"{file}:shout")
    assert fn(["p", "p"], ["HI", "hi"]) == [1.0, 0.0]
    for bad, message in [("json", "expected 'module:function'"), ("no_such_module_xyz:f", "cannot import"),
                         ("json:nothing", "no function 'nothing'"), (f"{tmp_path}/missing.py:f", "file not found")]:
        with pytest.raises(ConfigError, match=message):
            load_callable(bad)


def test_weighted_combination_and_metrics(tmp_path):
    file = tmp_path / "r.py"
    file.write_text("def prompt_len(prompts, completions, **columns):\n    return [len(p) for p in prompts]\n")
    sources = build_sources([{"builtin": "answer_match", "weight": 2.0},
                             {"function": f"{file}:prompt_len", "weight": 0.5},
                             {"builtin": "answer_match", "normalize": True, "weight": -1}])
    assert [s.name for s in sources] == ["answer_match", "prompt_len", "answer_match_2"]
    totals, metrics = score(sources, ["ab", "abcd"], ["yes", "No."], {"answer": ["yes", "no"]})
    assert totals == [2.0 + 1.0 - 1.0, 0.0 + 2.0 - 1.0]
    assert metrics == {"reward/answer_match": 0.5, "reward/prompt_len": 3.0, "reward/answer_match_2": 1.0}


def source(fn, name="my_reward"):
    return [RewardSource(name, fn)]


@pytest.mark.parametrize("fn, message", [
    (lambda p, c, **k: [1.0] * (len(c) - 1), "reward 'my_reward': returned 2 values for 3 completions"),
    (lambda p, c, **k: [1.0, "high", 0.0], "reward 'my_reward': prompt 1: returned 'high', not a number"),
    (lambda p, c, **k: [1.0, 2.0, math.nan], "reward 'my_reward': prompt 2: returned nan"),
    (lambda p, c, **k: [math.inf, 2.0, 0.0], "reward 'my_reward': prompt 0: returned inf"),
    (lambda p, c, **k: [True, 1.0, 0.0], "reward 'my_reward': prompt 0: returned True"),
    (lambda p, c, **k: {"rewards": [1, 2, 3]}, "reward 'my_reward': returned dict"),
    (lambda p, c, **k: [1.0, None, 0.0], "reward 'my_reward': prompt 1: returned None"),
    (lambda p, c, **k: [1.0 / (len(x) - 2) for x in c], "reward 'my_reward': prompt 1: raised ZeroDivisionError"),
])
def test_bad_outputs_name_the_function_and_prompt(fn, message):
    with pytest.raises(DataError) as err:
        score(source(fn), ["a", "b", "c"], ["xyz", "xy", "x"], {})
    assert message in str(err.value)


def test_skip_invalid_counts_none_and_raising_prompts():
    def flaky(prompts, completions, **columns):
        if "boom" in completions:
            raise RuntimeError("boom")
        return [None if c == "none" else 1.0 for c in completions]
    totals, metrics = score(source(flaky), ["p"] * 4, ["ok", "none", "boom", "ok"], {}, skip_invalid=True)
    assert totals == [1.0, 0.0, 0.0, 1.0]
    assert metrics == {"reward/my_reward": 1.0, "reward/skipped": 2}
    with pytest.raises(DataError, match="prompt 2: raised RuntimeError: boom"):
        score(source(flaky), ["p"] * 4, ["ok", "none", "boom", "ok"], {})
    with pytest.raises(DataError, match="prompt 1: returned nan"):  # NaN is never skipped
        score(source(lambda p, c, **k: [1.0, math.nan]), ["p"] * 2, ["a", "b"], {}, skip_invalid=True)


def test_columns_reach_functions_and_do_not_replace_builtin_options():
    seen = {}
    def record(prompts, completions, **columns):
        seen.update(columns)
        return [0.0] * len(completions)
    score(source(record), ["p"], ["c"], {"answer": ["a"], "tests": ["t"]})
    assert seen == {"answer": ["a"], "tests": ["t"]}
    # a dataset column called like an option ("pattern") leaves the configured option in force
    assert run({"builtin": "regex", "pattern": "^x"}, ["xy", "y"], pattern=["y", "y"]) == [1.0, 0.0]


# --------------------------------------------------------------------------- reward model and HTTP

def test_model_source_matches_score_sequences(tiny_model, tmp_path):
    import torch
    from posttrain.modeling import load_model, load_tokenizer
    tokenizer = load_tokenizer(str(tiny_model))
    torch.manual_seed(0)
    model = load_model(str(tiny_model), "reward", tokenizer=tokenizer)
    model.config.reward_offset = 0.25
    model.save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    (rm,) = build_sources([{"model": str(tmp_path / "rm"), "weight": 2.0}])
    prompts, completions = ["What is two plus three?", "Reverse cat."], ["five", "tac and more words"]
    values = rm.fn(prompts, completions)
    assert len(values) == 2 and all(math.isfinite(v) for v in values) and values[0] != values[1]
    # the same as scoring one at a time (padding does not change a reward) and includes the offset
    assert rm.fn(prompts[:1], completions[:1])[0] == pytest.approx(values[0], abs=1e-5)
    model.config.reward_offset = 0.0
    model.save_pretrained(tmp_path / "rm0")
    tokenizer.save_pretrained(tmp_path / "rm0")
    (rm0,) = build_sources([{"model": str(tmp_path / "rm0")}])
    assert [a - b for a, b in zip(values, rm0.fn(prompts, completions))] == pytest.approx([0.25, 0.25], abs=1e-5)
    totals, metrics = score([rm], prompts, completions, {})
    assert totals == pytest.approx([2 * v for v in values], abs=1e-5)
    assert metrics["reward/model"] == pytest.approx(sum(values) / 2, abs=1e-5)


class _Handler(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 - http.server's name
        batch = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/broken":
            body = b"not json"
        elif self.path == "/fail":
            self.send_error(500, "reward server error")
            return
        else:
            body = json.dumps({"rewards": [float(c == a) for c, a in
                                           zip(batch["completions"], batch["columns"]["answer"])]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def reward_server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    server = HTTPServer(("127.0.0.1", 0), _Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_http_source(reward_server):
    sources = build_sources([{"http": f"{reward_server}/score", "weight": 3.0, "timeout": 5}])
    totals, metrics = score(sources, ["q1", "q2"], ["4", "5"], {"answer": ["4", "6"]})
    assert totals == [3.0, 0.0] and metrics == {"reward/http": 0.5}
    with pytest.raises(DataError, match=f"reward endpoint {reward_server}/broken: the answer is not JSON"):
        score(build_sources([{"http": f"{reward_server}/broken"}]), ["q"], ["4"], {"answer": ["4"]})
    with pytest.raises(DataError, match="HTTP 500"):
        score(build_sources([{"http": f"{reward_server}/fail"}]), ["q"], ["4"], {"answer": ["4"]})
    with pytest.raises(ConfigError, match="reward endpoint http://127.0.0.1:9/x: cannot reach it"):
        score(build_sources([{"http": "http://127.0.0.1:9/x", "timeout": 2}]), ["q"], ["4"], {"answer": ["4"]})
