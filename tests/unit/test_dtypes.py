"""`auto` dtypes and attention: bfloat16 on CUDA and on CPUs with AMX, else float32; eager attention for a CPU
learner in bfloat16. The CPU's flags come from /proc/cpuinfo (a file of our own here)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from speed_async.config import ModelConfig, load_config
from speed_async.config.dtypes import cpu_flags, native_bfloat16, resolve_dtype
from speed_async.learner.model import attention_implementation, compute_dtype, mixed_precision

AMX = frozenset({"fpu", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"})
AVX2 = frozenset({"fpu", "avx2", "fma"})


def test_flags_are_read_from_the_first_cpu(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx2 amx_bf16\n\nprocessor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(info) == {"fpu", "avx2", "amx_bf16"}
    assert cpu_flags(tmp_path / "missing") == frozenset()
    (tmp_path / "noflags").write_text("processor\t: 0\n")
    assert cpu_flags(tmp_path / "noflags") == frozenset()


@pytest.mark.parametrize(
    ("name", "cuda", "flags", "expected"),
    [
        ("auto", True, AVX2, "bfloat16"),
        ("auto", False, AMX, "bfloat16"),
        ("auto", False, AVX2, "float32"),
        ("auto", False, frozenset({"avx512f", "avx512_bf16"}), "float32"),  # bf16 dot products without AMX
        ("float32", True, AMX, "float32"),
        ("bfloat16", False, AVX2, "bfloat16"),
        ("float16", False, AMX, "float16"),
    ],
)
def test_auto_is_bfloat16_only_where_it_is_native(name: str, cuda: bool, flags: frozenset[str], expected: str) -> None:
    assert resolve_dtype(name, cuda=cuda, flags=flags) == expected
    assert native_bfloat16(flags) == ("amx_bf16" in flags)


def test_learner_attention_is_eager_only_on_a_cpu_in_bfloat16() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16 = ModelConfig(train_dtype="bfloat16")
    assert attention_implementation(bf16, cpu) == "eager"
    assert attention_implementation(bf16, cuda) == "sdpa"
    assert attention_implementation(ModelConfig(train_dtype="float32"), cpu) == "sdpa"
    assert attention_implementation(ModelConfig(train_dtype="bfloat16", attn_implementation="sdpa"), cpu) == "sdpa"
    auto = ModelConfig(train_dtype="auto")
    assert compute_dtype(auto, cuda) == "bfloat16"
    assert compute_dtype(auto, cpu) == ("bfloat16" if native_bfloat16() else "float32")
    assert attention_implementation(auto, cpu) == ("eager" if native_bfloat16() else "sdpa")
    assert mixed_precision("float32") is None
    assert mixed_precision("bfloat16").param_dtype == torch.bfloat16
    with pytest.raises(ValueError, match=r"model\.train_dtype = 'auto' is invalid"):
        mixed_precision("auto")  # resolved before it gets here


def test_a_dtype_or_attention_that_does_not_exist_is_refused_by_field() -> None:
    with pytest.raises(ValueError, match=r"model\.train_dtype"):
        load_config(None, ["model.train_dtype=bf16"])
    with pytest.raises(ValueError, match=r"model\.attn_implementation"):
        load_config(None, ["model.attn_implementation=flash"])
    shipped = load_config(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.toml", [])
    assert (shipped.model.train_dtype, shipped.model.engine_dtype) == ("auto", "auto")
