"""Load and tokenize a run's prompt sources once, on the dispatcher, reporting what was skipped."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from speed_async.config import DataConfig
from speed_async.data.records import encode_extra
from speed_async.data.sources import BadRow, concat_sources, read_prompt_file
from speed_async.data.templates import OverlongPrompt, PromptEncoder

log = logging.getLogger("speed_async.data")


@dataclass(frozen=True)
class Prompt:
    """A tokenized prompt ready to hand to a sampler."""

    data_source: str
    token_ids: np.ndarray
    ground_truth: str
    extra: str = "{}"
    """The row's other fields as JSON (the third argument of a reward function)."""


@dataclass
class PreparedPrompts:
    """The prompts of one role (train or eval) and what was left out, with where it came from."""

    prompts: list[Prompt]
    skipped_rows: list[BadRow] = field(default_factory=list)
    overlong: list[OverlongPrompt] = field(default_factory=list)


def prepare_prompts(files: Sequence[str], tokenizer: Any, data: DataConfig) -> PreparedPrompts:
    """Read `files`, render and tokenize every prompt; bad and overlong rows follow the config's policy."""
    results = [read_prompt_file(path, on_bad_row=data.on_bad_row) for path in files]
    records = concat_sources(results)
    encoder = PromptEncoder(
        tokenizer,
        max_prompt_length=data.max_prompt_length,
        on_overlong=data.on_overlong_prompt,
        suffix=data.prompt_suffix,
        chat_template=data.chat_template,
    )
    encoded, overlong = encoder.encode_all(records)
    skipped = [bad for result in results for bad in result.skipped]
    for bad in skipped:
        log.warning("skipped %s row %d field %s: %s", bad.source, bad.row, bad.field, bad.message)
    for item in overlong:
        log.warning("skipped overlong prompt %s row %d: %d tokens", item.source, item.row, item.num_tokens)
    prompts = [
        Prompt(record.data_source, np.asarray(ids, dtype=np.int32), record.ground_truth, encode_extra(record.extra))
        for record, ids in encoded
    ]
    if not prompts:
        raise ValueError(f"no usable prompts in {list(files)} (skipped {len(skipped)} rows, {len(overlong)} overlong)")
    return PreparedPrompts(prompts, skipped, overlong)
