"""The request bodies the server accepts, as pydantic models (OpenAI's names, plus vLLM's common extensions).

Bodies are validated in strict JSON mode: `"max_tokens": "5"` is a wrong type, not 5; an integral float such as
`"n": 1.0` is the integer it spells (JavaScript clients send those). Unknown fields are ignored, but fields
that would change the answer and are not implemented (`response_format` other than text, `best_of` > 1,
`suffix`, beam search, guided decoding, `repetition_penalty` != 1, forcing a tool) are a 400 naming the field,
never silently dropped. Checks that need the model (context length, vocabulary) are in app.py.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

MAX_N = 16  # choices per prompt
MAX_LOGPROBS = 20  # top log-probs per token


def _integral(value):
    """1.0 -> 1 (a float that is a whole number); anything else is left for the strict int check."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


Int = Annotated[int, BeforeValidator(_integral)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Body):
    include_usage: bool = False


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ImageURL(_Body):
    url: str
    detail: Literal["auto", "low", "high"] | None = None  # accepted; the model's processor decides the size


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


class Message(_Body):
    model_config = ConfigDict(extra="allow", strict=True)  # tool_calls, tool_call_id, name reach the template

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]] | None = None

    def for_template(self) -> dict:
        """The message as chat templates know it: `developer` (OpenAI's newer name for the system role) becomes
        `system`; text parts are joined, an image part leaves its place (data/vision.IMAGE_SLOT)."""
        from ..data.vision import IMAGE_SLOT

        message = self.model_dump(exclude_none=True)
        if message["role"] == "developer":
            message["role"] = "system"
        if isinstance(self.content, list):
            message["content"] = "".join(part.text if isinstance(part, TextPart) else IMAGE_SLOT
                                         for part in self.content)
        message.setdefault("content", "")
        return message

    def image_urls(self, index: int) -> list[tuple[str, str]]:
        """(url, where) of each image part, `where` naming it as a 400 does (messages.I.content.J)."""
        if not isinstance(self.content, list):
            return []
        return [(part.image_url.url, f"messages.{index}.content.{j}") for j, part in enumerate(self.content)
                if isinstance(part, ImagePart)]


# fields with a value that means "off"; any other value is a 400 (not implemented, never silently ignored)
UNSUPPORTED = {"best_of": (None, 1), "suffix": (None, ""), "use_beam_search": (None, False),
               "repetition_penalty": (None, 1, 1.0), "guided_json": (None,), "guided_regex": (None,),
               "guided_choice": (None,), "guided_grammar": (None,), "functions": (None,), "function_call": (None,)}


class _Sampling(_Body):
    model_config = ConfigDict(extra="allow", strict=True)  # the extra fields are checked against UNSUPPORTED

    model: str
    max_tokens: Int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: Int = Field(default=0, ge=-1)  # vLLM's extension; -1 or 0: off
    n: Int = Field(default=1, ge=1, le=MAX_N)
    seed: Int | None = None  # any integer
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None  # token id (as a string) -> bias in [-100, 100]
    min_tokens: Int = Field(default=0, ge=0)  # vLLM's extension
    ignore_eos: bool = False  # vLLM's extension
    response_format: dict | None = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value):
        stops = [value] if isinstance(value, str) else (value or [])
        if any(not s for s in stops):
            raise ValueError("stop strings must not be empty")
        return stops

    @field_validator("temperature", "top_p", mode="before")
    @classmethod
    def _null_is_default(cls, value, info):
        return {"temperature": 1.0, "top_p": 1.0}[info.field_name] if value is None else value

    @field_validator("presence_penalty", "frequency_penalty", "min_tokens", "ignore_eos", mode="before")
    @classmethod
    def _null_is_off(cls, value, info):
        return {"ignore_eos": False, "min_tokens": 0}.get(info.field_name, 0.0) if value is None else value

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, value):
        for token, bias in (value or {}).items():
            if not token.lstrip("-").isdigit():
                raise ValueError(f"logit_bias keys are token ids, not {token!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100] (token {token}: {bias})")
        return value

    @field_validator("response_format")
    @classmethod
    def _format(cls, value):
        if value is not None and value.get("type", "text") != "text":
            raise ValueError(f"response_format {value.get('type')!r} is not supported (only text): structured "
                             "output is not implemented")
        return value

    @model_validator(mode="after")
    def _unsupported(self):
        for name, off in UNSUPPORTED.items():
            value = (self.model_extra or {}).get(name)
            if value not in off:
                raise ValueError(f"{name} is not supported by this server")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def bias(self) -> dict[int, float]:
        return {int(token): value for token, value in (self.logit_bias or {}).items()}


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    rag: bool = True  # with `serve --rag`: false answers without retrieval

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice(cls, value):
        if value not in (None, "auto", "none"):
            raise ValueError("tool_choice: only 'auto' and 'none' are supported (a forced tool call is not "
                             "implemented)")
        return value

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: Int | None = Field(default=16, ge=1)  # OpenAI's legacy default
    logprobs: Int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _not_empty(cls, value):
        if isinstance(value, list) and (not value or any(isinstance(p, list | str) and not p for p in value)):
            raise ValueError("prompt must not be empty")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list: strings, or token-id lists."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TokenizeRequest(_Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(_Body):
    model: str | None = None
    tokens: list[int]
