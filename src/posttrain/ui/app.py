"""`posttrain ui`: the web UI (Gradio). One module per tab; each calls library functions or starts `posttrain`
sub-commands as jobs (jobs.py); none holds training logic of its own. Every action also has an api_name, so the
UI is scriptable with gradio_client (README: "Web UI")."""
from __future__ import annotations

import logging
import os

from ..errors import ConfigError

log = logging.getLogger("posttrain")
TABS = ("Train", "Runs", "Chat", "Label", "Evaluate", "Export")


def build_app(workdir: str):
    import gradio as gr

    from .chat_tab import ChatTab
    from .evaluate_tab import EvaluateTab
    from .export_tab import ExportTab
    from .jobs import Jobs
    from .label_tab import LabelTab
    from .runs_tab import RunsTab
    from .train_tab import TrainTab
    from .workspace import Workspace

    ws = Workspace(workdir)
    jobs = Jobs(ws)
    tabs = {"Train": TrainTab(ws, jobs), "Runs": RunsTab(ws), "Chat": ChatTab(ws), "Label": LabelTab(ws, jobs),
            "Evaluate": EvaluateTab(ws, jobs), "Export": ExportTab(ws, jobs)}
    with gr.Blocks(title="posttrain") as app:
        gr.Markdown(f"## posttrain · workdir `{ws.root}`")
        with gr.Tabs():
            for name, tab in tabs.items():
                with gr.Tab(name, id=name.lower(), elem_id=f"tab-{name.lower()}") as page:
                    found = tab.build() or {}
                # a (re)loaded page: fresh file lists, the running job re-attached; opening a tab lists again what
                # appeared since (a run trained in Train is then in Runs and Chat without reloading the page)
                if "load" in found or "lists" in found:
                    fn, outputs = found.get("load") or found["lists"]
                    app.load(fn, None, outputs, api_visibility="private")
                if "lists" in found:
                    fn, outputs = found["lists"]
                    page.select(fn, None, outputs, api_visibility="private", show_progress="hidden")
    app.workspace, app.tabs = ws, tabs
    return app


def launch(workdir: str = ".", host: str = "127.0.0.1", port: int = 7860, auth: str | None = None,
           block: bool = True):
    """Serve the UI. Binding anything but the loopback without --auth is allowed but warned about: whoever
    reaches the port can start trainings and read the workdir's files."""
    credentials = parse_auth(auth)
    warning = exposure_warning(host, port, credentials)
    if warning:
        log.warning("%s", warning)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    app = build_app(workdir)
    app.queue(default_concurrency_limit=4)
    app.launch(server_name=host, server_port=port, auth=credentials, allowed_paths=[str(app.workspace.root)],
               prevent_thread_lock=not block, quiet=not block, show_error=True, footer_links=["api"], ssr_mode=False)
    return app


def parse_auth(auth: str | None) -> tuple[str, str] | None:
    if not auth:
        return None
    user, sep, password = auth.partition(":")
    if not sep or not user or not password:
        raise ConfigError("--auth: give USER:PASS")
    return user, password


def exposure_warning(host: str, port: int, credentials) -> str | None:
    if host in ("127.0.0.1", "localhost", "::1") or credentials is not None:
        return None
    return (f"the UI listens on {host} without --auth: anyone who can reach port {port} can start trainings and "
            f"read the files in the workdir; add --auth USER:PASS")
