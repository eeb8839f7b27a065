"""The web UI in a real browser: Debian's headless Chromium driven by Playwright (no browser download: the Debian
package `chromium-headless-shell`, which .ci/run installs; without it the test skips and says so). A training is
started the way the UI starts one before the UI server exists; the page finds it (re-attached), shows its progress,
curves and log, and stops it. Then the page starts an eval and an export, lists the stopped run in Runs and shows a
finished run's lineage, summary and plots, chats with a model and gives a thumbs up (a KTO row on disk), ranks one
prompt by clicking (a rankings row on disk), and shows the eval's perplexity (the one in its file) and the export's
end (a GGUF file). A screenshot of each tab goes to the test's temporary directory; `POSTTRAIN_UI_SCREENSHOTS=docs`
writes them to docs/ui-<tab>.png instead (the README shows those)."""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import pytest

from conftest import write_jsonl

pytest.importorskip("gradio", reason="the web UI needs the ui extra (pip install 'posttrain[ui]')")
playwright_api = pytest.importorskip("playwright.sync_api", reason="the browser test needs playwright (dev extra)")

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = ("chromium-headless-shell", "chromium", "/usr/lib/chromium/chromium-headless-shell",
            "/usr/lib/chromium/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run"]
QUESTIONS = ["Do you have soup today?", "What time do you open?", "Is there parking?"]
WAIT = 60_000  # ms; generous: the machine running the tests may be busy


def chromium() -> str | None:
    for name in CHROMIUM:
        found = shutil.which(name) or (name if Path(name).is_file() else None)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser_path() -> str:
    path = chromium()
    if path is None:
        pytest.skip("no Debian Chromium installed (apt-get install chromium-headless-shell; .ci/run does it)")
    return path


@pytest.fixture(scope="module")
def workdir(tiny_model, tmp_path_factory):
    """A model, SFT data and a candidates file to rank; a long SFT training started as a UI job (before any UI
    server: the page must re-attach to it) and, while it starts up, a finished 12-step SFT run (curves, plots,
    summary) trained in-process. Yields the workdir and the running job's id."""
    from posttrain.config import build_config
    from posttrain.train import run_training
    from posttrain.ui.jobs import Jobs
    from posttrain.ui.workspace import Workspace

    root = tmp_path_factory.mktemp("ui-browser")
    shutil.copytree(tiny_model, root / "model")
    (root / "data").mkdir()
    write_jsonl(root / "data/sft.jsonl", [{"messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                                        {"role": "assistant", "content": f"It is {2 * i}."}]}
                                          for i in range(24)])
    (root / "label").mkdir()
    write_jsonl(root / "label/chat.candidates.jsonl",
                [{"prompt": q, "responses": [f"{q} Answer {k}." for k in "ABC"]} for q in QUESTIONS])
    sft = {"data": {"train": "data/sft.jsonl", "max_length": 64, "eval_fraction": 0.2},
           "train": {"batch_size": 4, "lr": 1.0e-3, "eval_steps": 4}}
    (root / "live.yaml").write_text(json.dumps({**sft, "stage": "sft", "model": "model", "output_dir": "runs/live",
                                                "train": {**sft["train"], "max_steps": 5000}}))
    jobs = Jobs(Workspace(root))
    live = jobs.start("train", [str(root / "live.yaml")], output=root / "runs/live", title="sft -> runs/live")
    try:
        run_training(build_config({**sft, "stage": "sft", "model": str(root / "model"),
                                   "output_dir": str(root / "runs/sft"),
                                   "data": {**sft["data"], "train": str(root / "data/sft.jsonl")},
                                   "train": {**sft["train"], "max_steps": 12}}))
        yield root, live.id
    finally:
        process = jobs.children[live.id]
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)


@pytest.fixture
def shots(tmp_path) -> Path:
    wanted = os.environ.get("POSTTRAIN_UI_SCREENSHOTS")
    out = (ROOT / wanted) if wanted else tmp_path
    out.mkdir(parents=True, exist_ok=True)
    return out


def test_every_tab_in_a_browser(workdir, browser_path, shots, tmp_path):
    from posttrain.ui.app import launch
    from conftest import free_port

    root, live_job = workdir
    port = free_port()
    app = launch(str(root), port=port, block=False)
    try:
        with playwright_api.sync_playwright() as p:
            context = p.chromium.launch_persistent_context(str(tmp_path / "chromium-profile"),
                                                           executable_path=browser_path, headless=True, args=FLAGS,
                                                           viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            errors = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(f"http://127.0.0.1:{port}/", wait_until="load", timeout=WAIT)
            visit_train(page, root, live_job, shots)
            start_eval(page)  # the eval and the export run while the other tabs are visited
            start_export(page)
            visit_runs(page, shots)
            visit_chat(page, root, shots)
            visit_label(page, root, shots)
            check_eval(page, root, shots)
            check_export(page, root, shots)
            context.close()
            assert not errors, errors
    finally:
        app.close()
    for tab in ("train", "runs", "chat", "label", "evaluate", "export"):
        assert (shots / f"ui-{tab}.png").stat().st_size > 10_000


def visit_train(page, root: Path, job_id: str, shots: Path) -> None:
    """The page re-attached to the training started before it opened: its progress, curves and log update; Stop
    (pressed here) ends it after a checkpoint."""
    page.locator("#train-progress").get_by_text("running").wait_for(timeout=WAIT)
    assert job_id in page.locator("#train-job input").input_value()
    page.wait_for_function("""() => {
        const m = document.querySelector('#train-progress').innerText.match(/step (\\d+) \\//);
        return m && Number(m[1]) >= 12 && document.querySelector('#train-log textarea').value.includes('eval=');
    }""", timeout=WAIT)
    page.wait_for_timeout(2500)  # the next refresh draws the curves up to here
    page.locator("#train-loss-plot canvas, #train-loss-plot svg").first.wait_for(timeout=WAIT)
    # eval_loss is drawn beside loss, even when the plot was first drawn before the first eval
    wait_legend(page, "#train-loss-plot", ["loss", "eval_loss"])
    page.locator("#train-job").evaluate("e => e.scrollIntoView({block: 'start'})")
    page.screenshot(path=str(shots / "ui-train.png"))
    page.locator("#train-stop").click()
    page.locator("#train-message").get_by_text("stopping").wait_for(timeout=WAIT)
    page.locator("#train-progress").get_by_text("stopped").wait_for(timeout=WAIT)
    assert list((root / "runs/live/checkpoints").glob("step-*"))


def visit_runs(page, shots: Path) -> None:
    """Opening the tab lists the runs again: the one stopped from the Train tab after the page opened is there as
    unfinished (when the page opened it had no files yet or was running). Picking the finished run shows its
    lineage, summary and plots."""
    open_tab(page, "Runs")
    wait_text(page, "#runs-table", r"runs/live\s+sft\s+unfinished")
    assert page.locator("#runs-run input").input_value() == ""  # nothing chosen until the person chooses
    choose(page, "#runs-run", "runs/sft")
    page.locator("#runs-lineage").get_by_text("lineage").wait_for(timeout=WAIT)
    assert re.search(r"runs/sft\s*←\s*model", page.locator("#runs-lineage").inner_text())
    page.locator("#runs-summary").get_by_text("final_eval").wait_for(timeout=WAIT)
    page.locator("#runs-plots img").first.wait_for(timeout=WAIT)
    page.screenshot(path=str(shots / "ui-runs.png"))
    # compare one run, then two: the second run's loss curve is drawn too
    add_choice(page, "#runs-compare", "runs/sft")
    page.locator("#runs-compare-button").click()
    wait_legend(page, "#runs-overlay", ["runs/sft"])
    add_choice(page, "#runs-compare", "runs/live")
    page.locator("#runs-compare-button").click()
    wait_legend(page, "#runs-overlay", ["runs/sft", "runs/live"])


def visit_chat(page, workdir: Path, shots: Path) -> None:
    """A streamed answer from the tiny model, then a thumbs up: one KTO feedback row on disk."""
    open_tab(page, "Chat")
    choose(page, "#chat-model", "model")
    page.locator("#chat-message textarea").fill("What time do you open?")
    page.locator("#chat-send").click()
    page.locator("#chat-a").get_by_text("What time do you open?").wait_for(timeout=WAIT)
    # the message box is emptied once the answer has streamed to its end
    page.wait_for_function("document.querySelector('#chat-message textarea').value === ''", timeout=WAIT)
    answers = page.locator("#chat-a [data-testid=bot]")
    answers.first.wait_for(timeout=WAIT)
    assert answers.first.inner_text().strip()
    page.locator("#chat-a").get_by_role("button", name=re.compile("^like$", re.I)).first.click()
    page.locator("#chat-saved").get_by_text("👍").wait_for(timeout=WAIT)
    rows = [json.loads(line) for line in (workdir / "feedback/kto.jsonl").read_text().splitlines()]
    assert [(r["label"], r["messages"][0]["content"]) for r in rows] == [(True, "What time do you open?")]
    page.screenshot(path=str(shots / "ui-chat.png"))


def visit_label(page, workdir: Path, shots: Path) -> None:
    """Rank the first prompt by clicking (B best, A, C), submit: the ranking is on disk, the next prompt shows."""
    open_tab(page, "Label")
    choose(page, "#label-candidates", "label/chat.candidates.jsonl")
    page.locator("#label-open").click()
    page.locator("#label-prompt").get_by_text(QUESTIONS[0]).wait_for(timeout=WAIT)
    assert "0 / 3" in page.locator("#label-progress").inner_text()
    for slot, rank in enumerate(("2", "1", "3")):
        page.locator(f"#label-rank-{slot}").get_by_text(rank, exact=True).click()
    page.screenshot(path=str(shots / "ui-label.png"))
    page.locator("#label-submit").click()
    page.locator("#label-prompt").get_by_text(QUESTIONS[1]).wait_for(timeout=WAIT)
    assert "1 / 3" in page.locator("#label-progress").inner_text()
    rows = [json.loads(line) for line in (workdir / "label/chat.rankings.jsonl").read_text().splitlines()]
    assert [(r["item"], r["prompt"], r["ranks"], r["labeller"]) for r in rows] == \
        [(0, QUESTIONS[0], [2, 1, 3], "labeller")]


def start_eval(page) -> None:
    open_tab(page, "Evaluate")
    choose(page, "#eval-model", "runs/sft")
    choose(page, "#eval-data", "data/sft.jsonl")
    page.locator("#eval-start").click()
    wait_text(page, "#eval-job textarea, #eval-job input", r"^\d{8}-\d{6}-")


def check_eval(page, root: Path, shots: Path) -> None:
    """The eval of the finished run on its data, started from the page: its perplexity is shown, the one in the
    result file."""
    open_tab(page, "Evaluate")
    wait_text(page, "#eval-state", r"^finished")
    wait_text(page, "#eval-result", r"perplexity\s+\d")
    (result,) = (root / "evals").glob("sft-*.json")
    perplexity = json.loads(result.read_text())["perplexity"]
    assert perplexity > 1.0
    shown = re.search(r"(?m)^perplexity\s+([\d.]+)", page.locator("#eval-result").inner_text()).group(1)
    assert float(shown) == pytest.approx(perplexity, rel=1e-3)
    page.screenshot(path=str(shots / "ui-evaluate.png"))


def start_export(page) -> None:
    open_tab(page, "Export")
    choose(page, "#export-model", "runs/sft")
    page.locator("#export-format").get_by_text("gguf", exact=True).click()
    page.locator("#export-out textarea").fill("exports/sft.gguf")
    page.locator("#export-start").click()
    wait_text(page, "#export-log textarea", r"^\[(running|finished)\]")


def check_export(page, root: Path, shots: Path) -> None:
    """The GGUF export of the finished run, started from the page: the log says finished; the file is GGUF."""
    open_tab(page, "Export")
    wait_text(page, "#export-log textarea", r"^\[finished\]")
    assert (root / "exports/sft.gguf").read_bytes()[:4] == b"GGUF"
    page.screenshot(path=str(shots / "ui-export.png"))


def choose(page, selector: str, value: str) -> None:
    """Pick a value in a gradio dropdown as a person does: open it, type, click the option; the box then shows it."""
    box = page.locator(f"{selector} input")
    box.click()
    box.fill(value)
    page.locator(f"{selector} [role=option]", has_text=value).first.click()
    page.wait_for_function(f"document.querySelector('{selector} input').value === {json.dumps(value)}",
                           timeout=WAIT)


def wait_text(page, selector: str, pattern: str) -> None:
    """Wait until the text a person sees in `selector` matches: a text box's value, else innerText (which leaves out
    the hidden copies gradio keeps)."""
    try:
        page.wait_for_function("([selector, pattern]) => new RegExp(pattern).test("
                               "(e => e ? e.value ?? e.innerText : '')(document.querySelector(selector)))",
                               arg=[selector, pattern], timeout=WAIT)
    except playwright_api.TimeoutError:
        shown = page.locator(selector).evaluate("e => e.value ?? e.innerText")
        raise AssertionError(f"{selector} never matched {pattern!r}; it shows: {shown[-1500:]!r}") from None


def add_choice(page, selector: str, value: str) -> None:
    """Add a value to a multiselect dropdown as a person does: type it, click the option."""
    box = page.locator(f"{selector} input")
    box.click()
    box.fill(value)
    page.locator(f"{selector} [role=option]", has_text=value).first.click()
    box.press("Escape")
    wait_text(page, selector, re.escape(value))


def wait_legend(page, selector: str, names: list[str]) -> None:
    """Wait until a plot's legend (gradio draws its plots as SVG) names exactly these curves."""
    script = ("([selector, names]) => JSON.stringify(Array.from(document.querySelectorAll(selector + ' svg "
              ".role-legend-label text')).map(e => e.textContent)) === JSON.stringify(names)")
    try:
        page.wait_for_function(script, arg=[selector, names], timeout=WAIT)
    except playwright_api.TimeoutError:
        shown = page.evaluate("s => Array.from(document.querySelectorAll(s + ' svg .role-legend-label text'))"
                              ".map(e => e.textContent)", selector)
        raise AssertionError(f"{selector}'s legend never showed {names}; it shows {shown}") from None


def open_tab(page, name: str) -> None:
    page.evaluate("window.scrollTo(0, 0)")
    page.get_by_role("tab", name=name, exact=True).click()
    page.locator(f"#tab-{name.lower()}").wait_for(state="visible", timeout=WAIT)
