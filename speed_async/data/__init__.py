"""Prompt sources (VeRL parquet, problem/answer JSONL, the embedded arithmetic task) and prompt templates."""

from speed_async.data.ordering import PromptCursor, epoch_permutation
from speed_async.data.records import ChatMessages, PromptRecord
from speed_async.data.sources import BadRow, DataError, LoadResult, concat_sources, read_prompt_file
from speed_async.data.templates import INSTRUCTION_SUFFIX, OverlongPrompt, PromptEncoder, render_prompt

__all__ = [
    "INSTRUCTION_SUFFIX",
    "BadRow",
    "ChatMessages",
    "DataError",
    "LoadResult",
    "OverlongPrompt",
    "PromptCursor",
    "PromptEncoder",
    "PromptRecord",
    "concat_sources",
    "epoch_permutation",
    "read_prompt_file",
    "render_prompt",
]
