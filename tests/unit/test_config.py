"""Config: TOML + dotted overrides + VeRL aliases, and every invalid value rejected with key, value and rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from speed_async.config import (
    Config,
    config_from_dict,
    config_to_dict,
    field_docs,
    field_types,
    load_config,
    parse_override,
    write_resolved_config,
)
from speed_async.config.loader import explain_config

REPO = Path(__file__).resolve().parents[2]


def test_defaults_are_the_papers_speed_settings() -> None:
    config = Config()
    assert (config.rollout.n, config.rollout.n_continue, config.rollout.gen_batch_size) == (4, 20, 64)
    assert config.data.train_batch_size == 16
    assert config.curriculum.mode == "speed" and config.group_size == 24
    assert (config.optim.lr, config.optim.weight_decay, config.optim.grad_clip) == (1e-6, 0.1, 1.0)


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    config = load_config(path)
    assert config_from_dict(config_to_dict(config)) == config


def test_toml_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "run.toml"
    path.write_text('[rollout]\nn = 6\nn_continue = 10\n[trainer]\nseed = 3\n[data]\ntrain_files = ["a.jsonl"]\n')
    config = load_config(path, ["rollout.n=8", "pipeline.max_staleness=2", "data.eval_files=['x.jsonl','y']"])
    assert config.rollout.n == 8 and config.rollout.n_continue == 10 and config.trainer.seed == 3
    assert config.pipeline.max_staleness == 2
    assert config.data.train_files == ("a.jsonl",) and config.data.eval_files == ("x.jsonl", "y")


def test_parse_override_reads_toml_values_and_falls_back_to_strings() -> None:
    assert parse_override("rollout.n=8") == ("rollout.n", 8)
    assert parse_override("optim.lr=1e-5") == ("optim.lr", 1e-5)
    assert parse_override("data.chat_template=true") == ("data.chat_template", True)
    assert parse_override("model.path=/models/qwen") == ("model.path", "/models/qwen")
    with pytest.raises(ValueError, match="expected key=value"):
        parse_override("rollout.n")


def test_verl_aliases_map_to_native_keys(tmp_path: Path) -> None:
    path = tmp_path / "verl.toml"
    path.write_text(
        "[actor_rollout_ref.rollout]\nn = 4\nn_continue = 12\n"
        "[data]\ntrain_batch_size = 8\ngen_batch_size = 32\n"
        "[curriculum]\nenable = true\n"
    )
    config = load_config(path, ["algorithm.mini_batch_size=8"])
    assert (config.rollout.n, config.rollout.n_continue, config.rollout.gen_batch_size) == (4, 12, 32)
    assert config.data.train_batch_size == 8 and config.curriculum.mode == "speed"


def test_switch_aliases_choose_the_curriculum() -> None:
    assert load_config(None, ["curriculum.enable=false"]).curriculum.mode == "none"
    dapo = load_config(None, ["algorithm.filter_groups.enable=true"])
    assert dapo.curriculum.mode == "dapo" and dapo.rollout.n_continue == 0 and dapo.group_size == 4


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["rollout.nn=3"], r"unknown config key 'rollout.nn'.*did you mean rollout.n"),
        (["bogus.key=1"], r"unknown config key 'bogus.key'.*Sections: model, data"),
        (["rollout.n=abc"], r"rollout.n = 'abc' is invalid: expected an integer \(from command line\)"),
        (["rollout.n=2.5"], r"rollout.n = 2.5 is invalid: expected an integer"),
        (["data.chat_template=1"], r"data.chat_template = 1 is invalid: expected true or false"),
        (
            ["curriculum.mode=best"],
            r"curriculum.mode = 'best' is invalid: allowed values are 'speed', 'none'",
        ),
        (["rollout.n_continue=0"], r"rollout.n_continue = 0 is invalid: must be >= 1 with curriculum.mode"),
        (["rollout.n=1"], r"rollout.n = 1 is invalid: SPEED screens with rollout.n >= 2"),
        (["curriculum.mode=none", "rollout.n_continue=4"], r"rollout.n_continue = 4 is invalid: must be 0"),
        (["data.train_batch_size=12"], r"algorithm.mini_batch_size = 16 is invalid: must divide .* = 12"),
        (
            ["curriculum.enable=true", "algorithm.filter_groups.enable=true"],
            r"SPEED and DAPO dynamic sampling are alternatives",
        ),
        (
            ["curriculum.mode=none", "curriculum.enable=true"],
            r"curriculum.mode = 'none' \(from command line\) conflicts with curriculum.enable = true",
        ),
        (["actor_rollout_ref.rollout.n=8", "rollout.n=4"], r"conflicts with actor_rollout_ref.rollout.n = 8"),
        (["rollout.n=4", "actor_rollout_ref.rollout.n=8"], r"conflicts with rollout.n = 4"),
        (
            ["curriculum.pass_rate_low=0.6", "curriculum.pass_rate_high=0.5"],
            r"curriculum.pass_rate_high = 0.5",
        ),
        (["pipeline.max_staleness=-1"], r"pipeline.max_staleness = -1 is invalid: must be >= 0"),
        (["algorithm.clip_c=1.0"], r"algorithm.clip_c = 1.0 is invalid: must be > 1"),
        (
            ["algorithm.overlong_buffer=64"],
            r"algorithm.overlong_buffer = 64 is invalid: must be < rollout.max",
        ),
        (["cluster.num_learner_ranks=3"], r"must be a multiple of cluster.num_learner_ranks = 3"),
        (["data.train_files=[]"], r"data.train_files = \(\) is invalid: at least one source"),
        (["data.train_files=[1]"], r"data.train_files = \[1\] is invalid: expected a list of strings"),
        (["algorithm.off_policy_correction=gspo"], r"allowed values are 'none', 'tis', 'mis', 'icepop'"),
        (["algorithm.mis_low=1.2"], r"algorithm.mis_low = 1.2 is invalid: must be in \(0, 1\]"),
        (["algorithm.icepop_high=0.9"], r"algorithm.icepop_high = 0.9 is invalid: must be >= 1"),
        (["reward.functions.math=score"], r"reward.functions.math = 'score' is invalid: expected 'module:function'"),
        (["reward.functions.math=a b:c"], r"reward.functions.math = 'a b:c' is invalid: expected 'module:function'"),
        (["reward.functions.math=3"], r"reward.functions.math = 3 is invalid: expected a string"),
        (["reward.functions=['a:b']"], r"reward.functions = \['a:b'\] is invalid: expected a table of strings"),
    ],
)
def test_invalid_values_are_rejected_with_key_value_and_rule(overrides: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_config(None, overrides)


def test_the_command_line_overrides_the_file_and_conflicts_are_only_within_a_layer(tmp_path: Path) -> None:
    tiny = REPO / "configs" / "tiny-cpu.toml"  # curriculum.mode = "speed", rollout.n_continue = 12
    plain = load_config(tiny, ["curriculum.enable=false"])
    assert plain.curriculum.mode == "none" and plain.rollout.n_continue == 0 and plain.group_size == 4
    assert load_config(tiny, ["algorithm.filter_groups.enable=true"]).curriculum.mode == "dapo"
    assert load_config(tiny, ["curriculum.enable=true"]).rollout.n_continue == 12, "same mode: the file's value stays"
    path = tmp_path / "plain.toml"
    path.write_text("[curriculum]\nmode = 'none'\n[rollout]\nn_continue = 0\ngen_batch_size = 32\n")
    speed = load_config(path, ["curriculum.enable=true", "data.gen_batch_size=8"])
    assert speed.curriculum.mode == "speed" and speed.rollout.n_continue == 20, "SPEED's default, not the file's 0"
    assert speed.rollout.gen_batch_size == 8, "an alias on the command line overrides the file's native key"
    # Two settings of one layer that disagree stay an error, in the file as on the command line.
    both = tmp_path / "both.toml"
    both.write_text("[curriculum]\nmode = 'speed'\nenable = false\n")
    with pytest.raises(ValueError, match=r"curriculum.mode = 'speed' \(from .*both.toml\) conflicts with"):
        load_config(both, ["curriculum.enable=false"])
    with pytest.raises(ValueError, match=r"rollout.n_continue = 4 is invalid: must be 0"):
        load_config(tiny, ["curriculum.enable=false", "rollout.n_continue=4"])


def test_explain_names_the_layer_of_every_value() -> None:
    tiny = REPO / "configs" / "tiny-cpu.toml"
    config, origins = explain_config(tiny, ["curriculum.enable=false", "data.gen_batch_size=8", "rollout.n=6"])
    assert config.rollout.n == 6 and set(origins) == set(field_types())
    assert origins["rollout.n"] == "command line" and origins["data.train_batch_size"] == str(tiny)
    assert origins["rollout.gen_batch_size"] == "command line, as data.gen_batch_size"
    assert origins["curriculum.mode"] == "command line, as curriculum.enable"
    assert origins["rollout.n_continue"].startswith("curriculum.mode = 'none' (from command line")
    assert f"over rollout.n_continue = 12 (from {tiny})" in origins["rollout.n_continue"]
    assert origins["pipeline.sync_timeout_s"] == "default"


def test_reward_functions_from_the_file_and_the_command_line(tmp_path: Path) -> None:
    path = tmp_path / "rewards.toml"
    path.write_text('[reward.functions]\ncountdown = "pkg.mod:score"\n"lighteval/MATH" = "pkg.math:score"\n')
    config, origins = explain_config(path, ["reward.functions.countdown=other.mod:fn", "reward.functions.a.b=x:y"])
    # Per entry, the later layer wins; any text after the prefix (dots included) is the source's name.
    assert config.reward.functions == {"countdown": "other.mod:fn", "lighteval/MATH": "pkg.math:score", "a.b": "x:y"}
    assert "reward.functions.countdown: command line" in origins["reward.functions"]
    assert f"reward.functions.lighteval/MATH: {path}" in origins["reward.functions"]
    table = load_config(None, ['reward.functions={src = "m:f"}'])
    assert table.reward.functions == {"src": "m:f"} and load_config().reward.functions == {}
    assert config_from_dict(config_to_dict(config)) == config


def test_file_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[rollout\nn = 1\n")
    with pytest.raises(ValueError, match=r"bad.toml.*not valid TOML"):
        load_config(bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[rollout]\nn = 'four'\n")
    with pytest.raises(ValueError, match=r"rollout.n = 'four' is invalid.*from .*wrong.toml"):
        load_config(wrong)


def test_resolved_config_round_trips_through_the_run_dir(tmp_path: Path) -> None:
    config = load_config(None, ["rollout.n=8", "data.eval_files=['a.jsonl']"])
    path = write_resolved_config(config, tmp_path / "run")
    assert config_from_dict(json.loads(path.read_text())) == config


def test_every_field_has_a_docstring() -> None:
    docs = field_docs()
    missing = sorted(key for key in field_types() if not docs.get(key))
    assert not missing, f"fields without a docstring in config/schema.py: {missing}"
