"""A small byte-level BPE tokenizer for the tiny model, trained on the arithmetic task's text.

It uses Qwen2's pre-tokenizer split regex, so every digit is its own token and spaces and newlines
round-trip exactly (a character-level vocabulary under `model_type=qwen2` would silently drop them; see
ENVIRONMENT.md). Being byte level, it encodes and decodes any text, not only the task's. It is saved as a
transformers `PreTrainedTokenizerFast` that `AutoTokenizer.from_pretrained(dir)` loads.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from speed_async.data.arithmetic import load_split, solution_text
from speed_async.data.templates import INSTRUCTION_SUFFIX

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (EOS_TOKEN, "<|im_start|>", "<|im_end|>")
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
"""The split regex of Qwen2's tokenizer (digits are split one by one)."""


CORPUS_RECORDS = 5000
"""Train records whose text trains the tokenizer (more adds no new merges: the task's text is repetitive)."""


def task_corpus(seed: int = 0) -> list[str]:
    """The tokenizer's training text: the first `CORPUS_RECORDS` train prompts (with the instruction) and
    their solutions."""
    corpus = []
    for record in load_split("train", seed=seed)[:CORPUS_RECORDS]:
        assert isinstance(record.prompt, str)
        corpus.append(record.prompt + INSTRUCTION_SUFFIX)
        corpus.append(solution_text(record.prompt))
    return corpus


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE with Qwen2's pre-tokenization and the special tokens `SPECIAL_TOKENS`.

    `vocab_size` counts the 256 byte tokens and the special tokens, so it must exceed 256 + 3.
    """
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size <= minimum:
        raise ValueError(f"vocab_size={vocab_size} is too small; allowed: > {minimum} (bytes + special tokens)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=list(SPECIAL_TOKENS[1:]),
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )


def build_tokenizer(out_dir: Path, *, vocab_size: int = 512, seed: int = 0) -> PreTrainedTokenizerFast:
    """Train the task tokenizer on `task_corpus(seed)` and save it to `out_dir` (tokenizer.json + config)."""
    tokenizer = train_tokenizer(task_corpus(seed), vocab_size)
    tokenizer.save_pretrained(str(out_dir))
    return tokenizer
