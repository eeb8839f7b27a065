"""Export tab: `posttrain export` as a job: a LoRA adapter merged into its base (hf), one GGUF file for llama.cpp /
Ollama (gguf), or a checked adapter for vLLM (vllm)."""
from __future__ import annotations

from ..errors import PosttrainError
from ..export import FORMATS
from .jobs import Jobs
from .workspace import Workspace, path_dropdown


class ExportTab:
    def __init__(self, ws: Workspace, jobs: Jobs):
        self.ws, self.jobs = ws, jobs

    def start(self, model: str, adapter: str, out: str, format: str, quant: str, ollama: bool) -> tuple[str, str]:
        try:
            model_dir = self.ws.path(model, "model", exists=True)
            target = self.ws.path(out, "out")
            args = ["--model", str(model_dir), "--out", str(target), "--format", format or "hf"]
            if str(adapter or "").strip():
                args += ["--adapter", str(self.ws.path(adapter, "adapter", exists=True))]
            if format == "gguf":
                args += ["--quant", quant or "f16"] + (["--ollama"] if ollama else [])
            job = self.jobs.start("export", args, output=target, title=f"export {format} -> {self.ws.rel(target)}")
        except PosttrainError as exc:
            return "", f"not started: {exc}"
        return job.id, f"started job {job.id}"

    def status(self, job_id: str) -> dict:
        job = self.jobs.get(job_id)
        return {"job": job.id, "state": self.jobs.state(job), "output": self.ws.rel(job.output),
                "log_tail": self.jobs.log_tail(job, 2000)}

    def build(self):
        import gradio as gr

        gr.Markdown("Merge a LoRA adapter into its base model (hf), write a GGUF file for llama.cpp / Ollama, or "
                    "check an adapter for vLLM.")
        with gr.Row():
            model = path_dropdown(self.ws.models(), label="base model", elem_id="export-model")
            adapter = path_dropdown(self.ws.adapters(), label="adapter")
        with gr.Row():
            fmt = gr.Radio(list(FORMATS), value="hf", label="format", elem_id="export-format")
            quant = gr.Dropdown(["f16", "bf16", "q8_0", "q4_0"], value="f16", label="gguf type")
            ollama = gr.Checkbox(False, label="also an Ollama Modelfile (gguf)")
        out = gr.Textbox("exports/merged", label="out (a directory; FILE.gguf for gguf)", elem_id="export-out")
        start = gr.Button("Export", variant="primary", elem_id="export-start")
        job = gr.Textbox(label="job")
        message = gr.Markdown()
        log = gr.Textbox(label="log", lines=6, max_lines=6, elem_id="export-log")
        timer = gr.Timer(3.0)
        start.click(self.start, [model, adapter, out, fmt, quant, ollama], [job, message], api_name="export_start")

        def view(job_id):
            if not str(job_id or "").strip():
                return ""
            try:
                s = self.status(job_id)
            except PosttrainError as exc:
                return str(exc)
            return f"[{s['state']}]\n{s['log_tail']}"
        timer.tick(view, job, log, api_visibility="private", show_progress="hidden")
        gr.Button(visible=False).click(self.status, job, gr.JSON(visible=False, label="status"),
                                       api_name="export_status")

        def lists():
            return gr.update(choices=self.ws.models()), gr.update(choices=self.ws.adapters())
        return {"lists": (lists, [model, adapter])}
