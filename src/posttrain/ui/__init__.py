"""The web UI (`posttrain ui`): Train, Runs, Chat, Label, Evaluate and Export tabs over one workdir."""
from __future__ import annotations


def launch(*args, **kwargs):
    try:
        import gradio  # noqa: F401
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("the web UI needs gradio: pip install 'posttrain[ui]'") from None
    from .app import launch as run

    return run(*args, **kwargs)
