"""The one record type every prompt source produces."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ChatMessages = tuple[Mapping[str, str], ...]


@dataclass(frozen=True)
class PromptRecord:
    """One training or evaluation prompt, independent of the file format it came from.

    `prompt` is either plain text (base models) or chat messages (`{"role", "content"}` mappings) for a chat
    template. `row` is the 0-based row in the source (file or generated split) so errors and the ledger can
    point back at it; the dataset assigns the global `prompt_id` when sources are concatenated.
    """

    prompt_id: int
    data_source: str
    prompt: str | ChatMessages
    ground_truth: str
    source: str = ""
    row: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)


def encode_extra(extra: Mapping[str, Any]) -> str:
    """A row's extra fields as the JSON object text that work items carry to the reward functions; values JSON
    cannot hold become their str()."""
    return json.dumps(dict(extra), sort_keys=True, default=str)
