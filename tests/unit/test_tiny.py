"""The tiny default model: the shipped copy (checked by digest), tokenizer round trip, model build and forward
pass, warm-start build (pinned, a few steps) and cache."""

from __future__ import annotations

import json
import shutil
import threading
import tomllib
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from speed_async.cli import main
from speed_async.tiny import store, warmstart
from speed_async.tiny.model import TinyModelSpec, build_model, num_parameters, padded_vocab_size, tiny_config
from speed_async.tiny.store import SHIPPED_DIR, ensure_tiny_model
from speed_async.tiny.tokenizer import EOS_TOKEN, SPECIAL_TOKENS, task_corpus, train_tokenizer
from speed_async.tiny.warmstart import TinyRecipe, extract_boxed

REPO = Path(__file__).resolve().parents[2]


# ---- the shipped model ----------------------------------------------------------------------------------------
def test_builtin_tiny_is_the_shipped_model_of_the_default_recipe(tmp_path: Path) -> None:
    assert ensure_tiny_model() == SHIPPED_DIR == store.shipped_model_dir()
    assert ensure_tiny_model(tmp_path, recipe=TinyRecipe()) == SHIPPED_DIR and not any(tmp_path.iterdir())
    manifest = store.read_manifest()
    assert manifest["recipe_digest"] == TinyRecipe().digest(), "the shipped model must be the current recipe's"
    assert sorted(manifest["files"]) == sorted(p.name for p in SHIPPED_DIR.iterdir())
    info = json.loads((SHIPPED_DIR / "build_info.json").read_text())
    assert info["recipe_digest"] == TinyRecipe().digest() and info["numerics"]["cpu_capability"] == "AVX2"
    # The README's model: 0.641 / 0.815 on 200 held-out prompts, and its pass-count histogram.
    assert (round(info["eval"]["sampled_accuracy"], 3), info["eval"]["greedy_accuracy"]) == (0.641, 0.815)
    assert info["eval"]["pass_histogram"] == [26, 8, 18, 5, 16, 10, 25, 33, 59]
    tokenizer = AutoTokenizer.from_pretrained(str(SHIPPED_DIR))
    model = AutoModelForCausalLM.from_pretrained(str(SHIPPED_DIR))
    assert model.dtype == torch.float32 and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert num_parameters(model) == info["num_parameters"] == 1263872


def test_builtin_tiny_long_is_the_tiny_model_warm_started_on_the_sums(tmp_path: Path) -> None:
    from speed_async.tiny.longstart import LongRecipe

    long_dir = store.shipped_model_dir("builtin:tiny-long")
    manifest = store.read_manifest(store.MANIFEST_LONG)
    assert manifest["recipe_digest"] == LongRecipe().digest(), "the shipped model must be the current recipe's"
    assert sorted(manifest["files"]) == sorted(p.name for p in long_dir.iterdir())
    info = json.loads((long_dir / "build_info.json").read_text())
    assert info["recipe"]["base_digest"] == store.read_manifest()["recipe_digest"] == TinyRecipe().digest()
    # The tiny model's tokenizer byte for byte, its shape, a context of 1024 (the longest sum takes ~650 tokens).
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (long_dir / name).read_bytes() == (SHIPPED_DIR / name).read_bytes()
    config = json.loads((long_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 1024 and config["hidden_size"] == 256
    # The README's numbers: 200 held-out sums, n = 8 at temperature 1; short rungs solved, long ones never.
    assert (round(info["eval"]["sampled_accuracy"], 3), info["eval"]["greedy_accuracy"]) == (0.142, 0.215)
    assert info["eval"]["pass_histogram"] == [145, 17, 4, 4, 5, 6, 3, 6, 10]
    with pytest.raises(ValueError, match=r"'builtin:tiny-huge' is not a shipped model; allowed: \['builtin:tiny'"):
        store.shipped_model_dir("builtin:tiny-huge")
    assert store.resolve_builtin("runs/x/final_model") is None
    copy = tmp_path / "long"
    shutil.copytree(long_dir, copy)
    (copy / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config\.json has sha256 .*git checkout speed_async/tiny/model_files_long"):
        store.verify_model_dir(copy, manifest, store.MANIFEST_LONG)


def test_builtin_tiny_countdown_is_the_tiny_model_warm_started_on_countdown(tmp_path: Path) -> None:
    from speed_async.data.countdown import INSTRUCTION
    from speed_async.tiny.countdownstart import CountdownRecipe

    model_dir = store.resolve_builtin("builtin:tiny-countdown")
    assert model_dir == store.SHIPPED_COUNTDOWN_DIR == store.shipped_model_dir("builtin:tiny-countdown")
    manifest = store.read_manifest(store.MANIFEST_COUNTDOWN)
    assert manifest["recipe_digest"] == CountdownRecipe().digest(), "the shipped model must be the current recipe's"
    assert sorted(manifest["files"]) == sorted(p.name for p in model_dir.iterdir())
    info = json.loads((model_dir / "build_info.json").read_text())
    assert info["recipe"]["base_digest"] == store.read_manifest()["recipe_digest"] == TinyRecipe().digest()
    assert info["prompt_suffix"] == INSTRUCTION and info["numerics"]["cpu_capability"] == "AVX2"
    # The tiny model's tokenizer byte for byte, and its shape.
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert (model_dir / name).read_bytes() == (SHIPPED_DIR / name).read_bytes()
    config = json.loads((model_dir / "config.json").read_text())
    assert config["max_position_embeddings"] == 512 and config["hidden_size"] == 256
    # The README's numbers: 200 held-out problems, n = 8 at temperature 1; a spread of pass rates (97 of 200
    # prompts with some but not all samples correct).
    assert (round(info["eval"]["sampled_accuracy"], 3), info["eval"]["greedy_accuracy"]) == (0.134, 0.225)
    assert info["eval"]["pass_histogram"] == [103, 37, 26, 20, 9, 2, 2, 1, 0]
    copy = tmp_path / "countdown"
    shutil.copytree(model_dir, copy)
    (copy / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"config\.json has sha256 .*model_files_countdown.*countdownstart DIR"):
        store.verify_model_dir(copy, manifest, store.MANIFEST_COUNTDOWN)


def test_a_further_build_checks_its_directories_and_runs_where_the_numerics_are_pinned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from speed_async.tiny.countdownstart import CountdownRecipe
    from speed_async.tiny.further import begin_build

    kwargs = {"module": "speed_async.tiny.countdownstart", "what": "tiny-countdown"}
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    with pytest.raises(ValueError, match=r"is not empty; the tiny-countdown build needs a new or empty directory"):
        begin_build(taken, SHIPPED_DIR, CountdownRecipe(), **kwargs)
    other = CountdownRecipe(base_digest="0" * 12)
    with pytest.raises(ValueError, match=r"CountdownRecipe\.base_digest is 000000000000: start from the shipped"):
        begin_build(tmp_path / "new", SHIPPED_DIR, other, **kwargs)
    assert not (tmp_path / "new").exists(), "nothing is created for a refused build"
    for name, value in warmstart.pinned_numerics().items():  # this process already has the pins: build here
        monkeypatch.setenv(name, value)
    assert begin_build(tmp_path / "new", SHIPPED_DIR, CountdownRecipe(), **kwargs) is True
    assert (tmp_path / "new").is_dir()


def test_model_path_resolves_every_shipped_model_and_refuses_other_names(tmp_path: Path) -> None:
    from launcher.train import resolve_model

    for name, (model_dir, _) in store.BUILTIN_MODELS.items():
        assert resolve_model(name) == str(model_dir)
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    with pytest.raises(ValueError, match=r"'builtin:tiny-huge' is invalid: allowed builtin models: .*tiny-countdown"):
        resolve_model("builtin:tiny-huge")
    with pytest.raises(ValueError, match=r"'/no/such/dir' is invalid: not a directory \(or one of"):
        resolve_model("/no/such/dir")


def test_the_package_data_ships_every_file_of_the_model() -> None:
    # What a regular (non-editable) install copies: pyproject's package-data globs must cover the model.
    globs = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["speed_async"]
    package = REPO / "speed_async"
    shipped = {p.relative_to(package).as_posix() for d, _ in store.BUILTIN_MODELS.values() for p in d.iterdir()}
    shipped |= {m.relative_to(package).as_posix() for _, m in store.BUILTIN_MODELS.values()}
    covered = {p.relative_to(package).as_posix() for g in globs for p in package.glob(g)}
    assert shipped <= covered, sorted(shipped - covered)


def test_a_damaged_shipped_file_is_an_error_naming_it(tmp_path: Path) -> None:
    copy = tmp_path / "model"
    shutil.copytree(SHIPPED_DIR, copy)
    store.verify_model_dir(copy, store.read_manifest())
    assert store.compare_with_shipped(copy) == []
    weights = bytearray((copy / "model.safetensors").read_bytes())
    weights[-1] ^= 1  # one bit of one weight
    (copy / "model.safetensors").write_bytes(bytes(weights))
    with pytest.raises(ValueError, match=r"model\.safetensors has sha256 [0-9a-f]{64}, the manifest .* says") as err:
        store.verify_model_dir(copy, store.read_manifest())
    assert "make-tiny --out DIR" in str(err.value) and "git checkout speed_async/tiny/model_files" in str(err.value)
    assert store.compare_with_shipped(copy) == ["model.safetensors"]
    (copy / "tokenizer.json").unlink()
    with pytest.raises(ValueError, match=r"tokenizer\.json is missing"):
        store.verify_model_dir(copy, {"files": {"tokenizer.json": "0" * 64}})


def test_make_tiny_rebuilds_from_the_recipe_and_compares_with_the_shipped_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    builds: list[tuple[Path, TinyRecipe]] = []

    def fake_build(out_dir: Path, *, recipe: TinyRecipe, **kwargs: object) -> Path:  # stands in for 2 minutes
        builds.append((out_dir, recipe))
        shutil.copytree(SHIPPED_DIR, out_dir, dirs_exist_ok=True)
        return out_dir

    monkeypatch.setattr(warmstart, "build_tiny", fake_build)
    assert main(["make-tiny", "--out", str(tmp_path / "same")]) == 0
    assert builds == [(tmp_path / "same", TinyRecipe())]
    assert "the same bytes as the shipped model" in capsys.readouterr().out
    monkeypatch.setenv("SPEED_ASYNC_CACHE", str(tmp_path / "cache"))

    def other_build(out_dir: Path, **kwargs: object) -> Path:
        fake_build(out_dir, **kwargs)
        (out_dir / "model.safetensors").write_bytes(b"other weights")
        return out_dir

    monkeypatch.setattr(warmstart, "build_tiny", other_build)
    assert main(["make-tiny"]) == 0  # into the cache
    out = capsys.readouterr().out
    assert f"tiny-{TinyRecipe().digest()}" in out and "differs from the shipped model" in out
    assert "in model.safetensors:" in out


# A recipe small enough to build in a few seconds: 2 optimizer steps, 2 held-out prompts x 2 samples.
SMALL = TinyRecipe(
    model=TinyModelSpec(hidden_size=64, num_layers=1, head_dim=32, num_kv_heads=1, intermediate_size=64),
    steps=2,
    batch_size=4,
    warmup_steps=1,
    eval_prompts=2,
    eval_n=2,
    max_new_tokens=4,
)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(task_corpus(seed=0)[:2000], vocab_size=512).save_pretrained(str(out))
    return out


ROUND_TRIP_TEXTS = [
    "What is 47 + 38? Let's think step by step and output the final answer within \\boxed{}.",
    "7+8=15, 4+3+1=8. \\boxed{85}",
    "  two leading spaces, trailing two  ",
    "line one\nline two\n\n\tindented\r\nwindows line",
    "digits 0123456789 and 3.14159 and -42",
    "unicode: é ü ß 中文 🙂 — done",
    "<|im_start|>user\nhi<|im_end|>",
]


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_tokenizer_round_trips_arbitrary_text(tokenizer_dir: Path, text: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text


def test_tokenizer_splits_digits_and_knows_its_special_tokens(tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    pieces = [tokenizer.decode([i]) for i in tokenizer("x 123456")["input_ids"]]
    assert pieces[-6:] == ["1", "2", "3", "4", "5", "6"]
    assert tokenizer.eos_token == EOS_TOKEN and tokenizer.pad_token == EOS_TOKEN
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2]
    # The instruction's words are learned merges: it costs far fewer tokens than its 71 characters.
    assert len(tokenizer(" Let's think step by step and output the final answer within \\boxed{}.")["input_ids"]) < 20


def test_tokenizer_rejects_a_vocab_without_room_for_merges() -> None:
    with pytest.raises(ValueError, match="vocab_size=259"):
        train_tokenizer(["a b"], vocab_size=259)


def test_model_builds_deterministically_and_runs_forward() -> None:
    spec = TinyModelSpec(hidden_size=64, num_layers=2, head_dim=32, num_kv_heads=1, intermediate_size=96)
    config = tiny_config(spec, vocab_size=padded_vocab_size(309), eos_token_id=0, pad_token_id=0)
    assert config.vocab_size == 320 and config.tie_word_embeddings
    first, second = build_model(config, seed=3), build_model(config, seed=3)
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(first.lm_head.weight, build_model(config, seed=4).lm_head.weight)
    # Parameters by hand: embedding 320*64 (tied with lm_head) = 20480; per layer: q 64*64 + 64 bias,
    # k and v 64*32 + 32 bias each, o 64*64, MLP 3*64*96, two norms 2*64 -> 4160 + 2*2080 + 4096 + 18432
    # + 128 = 30976; two layers 61952; final norm 64. Total 20480 + 61952 + 64 = 82496.
    assert num_parameters(first) == 82496
    logits = first(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 320) and torch.isfinite(logits).all()
    assert first.generation_config.eos_token_id == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"head_dim": 16}, "head_dim=16"),
        ({"hidden_size": 100}, "hidden_size=100"),
        ({"num_kv_heads": 3}, "num_kv_heads=3"),
    ],
)
def test_model_spec_rejects_bad_shapes(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        TinyModelSpec(**{"hidden_size": 128, "head_dim": 32, "num_kv_heads": 2, **kwargs})


def test_extract_boxed_takes_the_last_box() -> None:
    assert extract_boxed("1+2=3. \\boxed{3}") == "3"
    assert extract_boxed("\\boxed{1} then \\boxed{ 2 }") == "2"
    assert extract_boxed("no box") is None


def test_recipe_digest_changes_with_every_field() -> None:
    base = TinyRecipe()
    assert base.digest() == TinyRecipe().digest()
    assert (
        len({base.digest(), TinyRecipe(steps=1).digest(), TinyRecipe(lr=1e-3).digest(), TinyRecipe(seed=1).digest()})
        == 4
    )
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        TinyRecipe(warmup_steps=-1)
    with pytest.raises(ValueError, match="steps=0"):
        TinyRecipe(steps=0)


def test_ensure_tiny_model_builds_once_and_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in warmstart.pinned_numerics().items():  # build in this process (the pin has its own test)
        monkeypatch.setenv(name, value)
    builds = []
    real_build = warmstart.build_tiny

    def counting_build(out_dir: Path, **kwargs: object) -> Path:
        builds.append(out_dir)
        return real_build(out_dir, **kwargs)

    monkeypatch.setattr(warmstart, "build_tiny", counting_build)
    results: list[Path] = []
    callers = [
        threading.Thread(target=lambda: results.append(ensure_tiny_model(tmp_path, recipe=SMALL))) for _ in range(2)
    ]
    for caller in callers:
        caller.start()
    for caller in callers:
        caller.join()
    assert len(builds) == 1 and results[0] == results[1] == tmp_path / f"tiny-{SMALL.digest()}"
    assert ensure_tiny_model(tmp_path, recipe=SMALL) == results[0] and len(builds) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([results[0].name, results[0].name + ".lock"])

    model_dir = results[0]
    info = json.loads((model_dir / "build_info.json").read_text())
    assert info["recipe"]["steps"] == 2 and info["recipe_digest"] == SMALL.digest()
    assert sum(info["eval"]["pass_histogram"]) == 2 and len(info["eval"]["pass_histogram"]) == 3
    assert info["build_seconds"] > 0 and info["num_parameters"] > 0
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir))
    assert model.dtype == torch.float32 and model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.decode(tokenizer("a  b\n\nc 12")["input_ids"]) == "a  b\n\nc 12"


def test_build_pins_its_numerics_whatever_the_callers_cpu_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A caller running at AVX-512 width still gets an AVX2 build: the build runs in a process of its own under
    # `pinned_numerics()` and records what torch used there. (Unpinned, an AVX-512 and a default-width build
    # of this recipe differ in the weights' last bits, and 400 steps make that another model: see the README.)
    pins = warmstart.pinned_numerics()
    if not pins:
        pytest.skip("numerics are pinned on x86-64 only")
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx512")
    monkeypatch.delenv("MKL_CBWR", raising=False)
    built = warmstart.build_tiny(tmp_path / "model", recipe=SMALL)
    info = json.loads((built / "build_info.json").read_text())
    assert info["numerics"]["env"] == pins
    supported = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
    assert info["numerics"]["cpu_capability"] == ("AVX2" if supported else "DEFAULT")


def test_a_failed_build_process_is_reported_with_its_output(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not warmstart.pinned_numerics():
        pytest.skip("the build runs in a process of its own on x86-64 only")
    monkeypatch.setattr(warmstart.sys, "executable", "/bin/false")
    with pytest.raises(RuntimeError, match=r"tiny-model build into .*broken exited with code 1"):
        warmstart.build_tiny(tmp_path / "broken", recipe=SMALL)


def test_recipe_round_trips_through_its_dict() -> None:
    import dataclasses

    assert warmstart.recipe_from_dict(dataclasses.asdict(SMALL)) == SMALL


def test_ensure_tiny_model_leaves_nothing_after_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def crashing_build(out_dir: Path, **kwargs: object) -> Path:
        (out_dir / "model.safetensors").write_text("half")
        raise RuntimeError("killed mid-build")

    monkeypatch.setattr(warmstart, "build_tiny", crashing_build)
    with pytest.raises(RuntimeError, match="mid-build"):
        ensure_tiny_model(tmp_path, recipe=SMALL)
    assert [p.name for p in tmp_path.iterdir()] == [f"tiny-{SMALL.digest()}.lock"]


def test_default_cache_dir_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEED_ASYNC_CACHE", str(tmp_path))
    assert store.default_cache_dir() == tmp_path
    monkeypatch.delenv("SPEED_ASYNC_CACHE")
    assert store.default_cache_dir() == Path.home() / ".cache" / "speed_async"


def test_waiting_for_another_builder_times_out_naming_the_lock(tmp_path: Path) -> None:
    import fcntl

    lock_path = tmp_path / f"tiny-{SMALL.digest()}.lock"
    with open(lock_path, "w") as held:  # another builder holds the lock (its own open file description)
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(TimeoutError, match=rf"{lock_path.name} for over 0 s: it builds the tiny model"):
            ensure_tiny_model(tmp_path, recipe=SMALL, lock_timeout_s=0.2)
    assert not (tmp_path / f"tiny-{SMALL.digest()}").exists(), "nothing built while waiting"
