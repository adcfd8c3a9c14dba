"""Turn a `PromptRecord` into the prompt text and token ids the sampler generates from.

The instruction of the paper is appended to the problem: to a plain string prompt directly, to the LAST
user message of a chat prompt. With ``chat_template=True`` the tokenizer's chat template renders the
messages (a plain string prompt becomes one user message first); without it the contents of the chat
messages are joined with a newline. Prompts longer than ``max_prompt_length`` tokens are never truncated:
they are reported, and either raise or are skipped.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal, NamedTuple

from speed_async.data.records import PromptRecord
from speed_async.data.sources import DataError

INSTRUCTION_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
"""The instruction appended to every problem in SPEED-RL (arXiv 2506.09016)."""

OnOverlong = Literal["error", "skip"]


class OverlongPrompt(NamedTuple):
    """A prompt whose token count exceeds the limit (where it came from and how long it is)."""

    source: str
    row: int
    num_tokens: int


def render_prompt(
    record: PromptRecord,
    *,
    tokenizer: Any = None,
    suffix: str = INSTRUCTION_SUFFIX,
    chat_template: bool = False,
) -> str:
    """The prompt text of ``record`` with ``suffix`` appended to the problem.

    - plain string prompt, ``chat_template=False``: ``prompt + suffix``;
    - chat messages, ``chat_template=False``: the message contents joined with ``"\\n"`` (roles dropped);
    - ``chat_template=True``: ``tokenizer.apply_chat_template(messages, tokenize=False,
      add_generation_prompt=True)``, a plain string prompt being the single user message.

    Raises ValueError when ``chat_template=True`` and the tokenizer is missing or has no chat template, or
    when a chat prompt has no user message.
    """
    if isinstance(record.prompt, str):
        if not chat_template:
            return record.prompt + suffix
        messages = [{"role": "user", "content": record.prompt + suffix}]
    else:
        messages = _append_to_last_user(record, suffix)
        if not chat_template:
            return "\n".join(message["content"] for message in messages)
    if tokenizer is None or getattr(tokenizer, "chat_template", None) is None:
        name = getattr(tokenizer, "name_or_path", None) or type(tokenizer).__name__
        raise ValueError(
            f"data.chat_template=True but tokenizer {name!r} has no chat template; "
            "set data.chat_template=false or use a tokenizer that has one"
        )
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert isinstance(text, str), type(text)
    return text


class PromptEncoder:
    """Renders and tokenizes prompts, enforcing ``max_prompt_length`` without ever truncating.

    Text rendered by a chat template is tokenized with ``add_special_tokens=False`` (the template already
    holds the special tokens, e.g. a BOS); plain text gets the tokenizer's default special tokens, as vLLM
    would add for a text prompt. Every prompt over the limit is appended to `overlong`; with
    ``on_overlong="error"`` it then raises `DataError`, with ``"skip"`` `encode` returns None.
    """

    def __init__(
        self,
        tokenizer: Any,
        *,
        max_prompt_length: int,
        on_overlong: OnOverlong = "error",
        suffix: str = INSTRUCTION_SUFFIX,
        chat_template: bool = False,
    ) -> None:
        if isinstance(max_prompt_length, bool) or not isinstance(max_prompt_length, int) or max_prompt_length < 1:
            raise ValueError(f"max_prompt_length must be an integer >= 1, got {max_prompt_length!r}")
        if on_overlong not in ("error", "skip"):
            raise ValueError(f"on_overlong must be 'error' or 'skip', got {on_overlong!r}")
        self.tokenizer = tokenizer
        self.max_prompt_length = max_prompt_length
        self.on_overlong = on_overlong
        self.suffix = suffix
        self.chat_template = chat_template
        self.overlong: list[OverlongPrompt] = []

    def encode(self, record: PromptRecord) -> list[int] | None:
        """Token ids of the rendered prompt, or None when it is over the limit and ``on_overlong="skip"``."""
        text = render_prompt(record, tokenizer=self.tokenizer, suffix=self.suffix, chat_template=self.chat_template)
        ids = list(self.tokenizer.encode(text, add_special_tokens=not self.chat_template))
        if len(ids) <= self.max_prompt_length:
            return ids
        self.overlong.append(OverlongPrompt(record.source, record.row, len(ids)))
        if self.on_overlong == "error":
            reason = (
                f"prompt has {len(ids)} tokens, over max_prompt_length {self.max_prompt_length} "
                "(prompts are never truncated; raise data.max_prompt_length or set data.on_overlong_prompt='skip')"
            )
            raise DataError(record.source, reason, row=record.row, field="prompt")
        return None

    def encode_all(
        self, records: Iterable[PromptRecord]
    ) -> tuple[list[tuple[PromptRecord, list[int]]], list[OverlongPrompt]]:
        """(record, token ids) for every prompt within the limit, and the overlong prompts of this call."""
        first_new = len(self.overlong)
        encoded = []
        for record in records:
            ids = self.encode(record)
            if ids is not None:
                encoded.append((record, ids))
        return encoded, self.overlong[first_new:]


def _append_to_last_user(record: PromptRecord, suffix: str) -> list[dict[str, str]]:
    assert not isinstance(record.prompt, str)
    messages = [{"role": message["role"], "content": message["content"]} for message in record.prompt]
    users = [i for i, message in enumerate(messages) if message["role"] == "user"]
    if not users:
        raise ValueError(f"{record.source}, row {record.row}: chat prompt has no message with role 'user'")
    messages[users[-1]]["content"] += suffix
    return messages
