"""The Train tab's options, generated from the config schema (config.py): one input per field, labelled with its
dotted key and described by its pydantic Field description, so the form never drifts from what `posttrain train`
accepts. Only values that differ from the defaults go into the YAML the form writes.
"""
from __future__ import annotations

import json
import types
import typing
from dataclasses import dataclass
from typing import Any, Literal

import yaml
from pydantic import BaseModel

from ..config import Config

# fields the Train tab shows in its header (model, data) or drives with its buttons (resume)
HEADER = ("stage", "model", "output_dir", "data.train", "data.eval", "resume")
# config sections only some stages read: shown for those stages only
STAGE_SECTIONS = {"rm": ("rm",), "dpo": ("dpo",), "kto": ("kto",), "ppo": ("rewards", "generation", "ppo"),
                  "grpo": ("rewards", "generation", "grpo"), "embed": ("embed",)}
SECTION_TITLES = {"": "model and run", "data": "data", "train": "training loop", "adapter": "adapter (LoRA)",
                  "freeze": "freeze fine-tuning", "rm": "reward model (rm)", "dpo": "dpo", "kto": "kto",
                  "rewards": "rewards (ppo, grpo)", "generation": "rollout sampling (ppo, grpo)", "ppo": "ppo",
                  "grpo": "grpo", "embed": "embed"}
BOOL_OR_AUTO = ["false", "true", "auto"]


@dataclass
class FieldSpec:
    key: str  # dotted: train.lr
    section: str  # "" for top-level fields
    kind: str  # bool | int | float | text | choice | yaml
    default: Any
    description: str
    choices: list[str] | None = None
    optional: bool = False


def _kind(annotation) -> tuple[str, list[str] | None, bool]:
    """(kind, choices, optional) of a field's type."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return "choice", [str(a) for a in args], False
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        optional = len(rest) < len(args)
        if len(rest) == 1:
            kind, choices, _ = _kind(rest[0])
            return kind, choices, optional
        if set(rest) == {bool, Literal["auto"]}:
            return "choice", BOOL_OR_AUTO, optional
        return "yaml", None, optional
    if annotation is bool:
        return "bool", None, False
    if annotation in (int, float, str):
        return {int: "int", float: "float", str: "text"}[annotation], None, False
    return "yaml", None, False


def field_specs() -> list[FieldSpec]:
    specs = []
    for name, info in Config.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            for sub, sub_info in annotation.model_fields.items():
                specs.append(_spec(f"{name}.{sub}", name, sub_info))
        else:
            specs.append(_spec(name, "rewards" if name == "rewards" else "", info))
    return [s for s in specs if s.key not in HEADER]


def _spec(key: str, section: str, info) -> FieldSpec:
    kind, choices, optional = _kind(info.annotation)
    if info.is_required():
        default = None
    elif info.default_factory is not None:
        default = info.default_factory()
    else:
        default = info.default
    return FieldSpec(key, section, kind, _plain(default), info.description or "", choices, optional)


def _plain(value):
    return json.loads(json.dumps(value)) if isinstance(value, (tuple, list, dict)) else value


def shown_value(spec: FieldSpec, value):
    """A config value as its form input holds it."""
    if spec.kind == "yaml":
        return "" if value is None else yaml.safe_dump(value, default_flow_style=True, width=1000).strip()
    if spec.kind == "choice" and spec.choices == BOOL_OR_AUTO:
        return str(value).lower()
    if spec.kind == "choice":
        return None if value is None else str(value)
    if spec.kind == "text":
        return value or ""
    return value


def parsed_value(spec: FieldSpec, shown):
    """The form input's value as a config value (errors are left to the config's own validation)."""
    if spec.kind == "yaml":
        if not str(shown or "").strip():
            return None
        try:
            return yaml.safe_load(shown)
        except yaml.YAMLError:
            return shown  # the config validation names the key
    if spec.kind == "choice" and spec.choices == BOOL_OR_AUTO:
        return {"false": False, "true": True}.get(shown, shown)
    if spec.kind in ("int", "float"):
        if shown is None or shown == "":
            return None
        return int(shown) if spec.kind == "int" and float(shown).is_integer() else shown
    if spec.kind == "text":
        return shown if str(shown or "").strip() else None
    return shown


def to_raw(specs: list[FieldSpec], values: list, head: dict) -> dict:
    """The config mapping: the header's keys, then every field whose value differs from its default."""
    raw: dict = {}
    for key, value in head.items():
        if value not in (None, "", []):
            _put(raw, key, value)
    for spec, shown in zip(specs, values):
        value = parsed_value(spec, shown)
        if value != spec.default and not (value is None and spec.default in (None, [], {})):
            _put(raw, spec.key, value)
    return raw


def _put(raw: dict, key: str, value) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _get(raw: dict, key: str, default):
    node = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node


def from_raw(specs: list[FieldSpec], raw: dict) -> list:
    """The form inputs' values for a config mapping (defaults where it says nothing)."""
    return [shown_value(spec, _get(raw, spec.key, spec.default)) for spec in specs]


def dump(raw: dict) -> str:
    return yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)


def build_components(specs: list[FieldSpec]):
    """The gradio inputs, one accordion per section; returns (components, {section: accordion})."""
    import gradio as gr

    components, accordions = [], {}
    sections = list(dict.fromkeys(s.section for s in specs))
    for section in sections:
        stage_only = any(section in names for names in STAGE_SECTIONS.values())
        with gr.Accordion(f"options: {SECTION_TITLES.get(section, section)}", open=False,
                          visible=not stage_only) as accordion:
            accordions[section] = accordion
            for spec in (s for s in specs if s.section == section):
                components.append(_component(spec))
    return components, accordions


def _component(spec: FieldSpec):
    import gradio as gr

    value = shown_value(spec, spec.default)
    common = {"label": spec.key, "info": spec.description, "elem_id": "cfg-" + spec.key.replace(".", "-")}
    if spec.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if spec.kind == "choice":
        return gr.Dropdown(choices=spec.choices, value=value, **common)
    if spec.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if spec.kind == "int" else None, **common)
    return gr.Textbox(value=value, lines=1, **common)
