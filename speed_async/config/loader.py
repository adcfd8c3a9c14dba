"""Build a `Config` from TOML files, dotted overrides and the reference code's (VeRL) key names.

    Config <- defaults <- TOML file <- `key=value` overrides, then validation

Three layers, each overriding the one before key by key: the defaults, the file, the command line. Within a
layer, keys are flattened to dotted paths (`rollout.n`), aliases are mapped to their native keys and the
curriculum switches (`curriculum.enable`, `algorithm.filter_groups.enable`) become `curriculum.mode`; two
settings of one layer that disagree (an alias and its native key, a switch and `curriculum.mode`) are an
error. Across layers the later one wins: `curriculum.enable=false` on the command line gives mode `none` even
when the file says `speed`, and a file's `rollout.n_continue` that only fits the file's mode gives way to the
new mode's default. Then every value is checked against its field's type, and only then are the frozen
dataclasses built (their `__post_init__` checks ranges and cross-field rules). Nothing starts before all of
this has passed. `explain_config` says which layer set each value.
"""

from __future__ import annotations

import dataclasses
import difflib
import itertools
import json
import tomllib
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from speed_async.config.schema import Config

# VeRL / SPEED reference names -> native keys. Boolean switches of the curriculum are handled in `_apply_aliases`.
ALIASES: dict[str, str] = {
    "actor_rollout_ref.rollout.n": "rollout.n",
    "actor_rollout_ref.rollout.n_continue": "rollout.n_continue",
    "actor_rollout_ref.rollout.temperature": "rollout.temperature",
    "actor_rollout_ref.rollout.top_p": "rollout.top_p",
    "actor_rollout_ref.rollout.gpu_memory_utilization": "rollout.gpu_memory_utilization",
    "actor_rollout_ref.actor.optim.lr": "optim.lr",
    "actor_rollout_ref.actor.clip_ratio_low": "algorithm.clip_low",
    "actor_rollout_ref.actor.clip_ratio_high": "algorithm.clip_high",
    "actor_rollout_ref.actor.clip_ratio_c": "algorithm.clip_c",
    "actor_rollout_ref.model.path": "model.path",
    "data.gen_batch_size": "rollout.gen_batch_size",
    "data.max_response_length": "rollout.max_response_length",
    "trainer.total_training_steps": "trainer.total_steps",
    "trainer.test_freq": "trainer.eval_every",
    "trainer.save_freq": "trainer.save_every",
    "algorithm.adv_estimator": "algorithm.advantage",
}
SWITCHES = ("curriculum.enable", "algorithm.filter_groups.enable")
MAPPINGS = ("reward.functions",)
"""Keys whose value is a table of str: `reward.functions.<source>` sets one entry (any text after the prefix,
dots included, is the entry's name); each entry is a key of its own in the layers."""


def _mapping_of(key: str) -> str | None:
    """The mapping key that `key` sets an entry of (`reward.functions.x` -> `reward.functions`), else None."""
    return next((m for m in MAPPINGS if key.startswith(m + ".") and len(key) > len(m) + 1), None)


def field_types() -> dict[str, Any]:
    """Every native dotted key of the config tree and its resolved type annotation."""
    out: dict[str, Any] = {}
    for section in dataclasses.fields(Config):
        section_cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(section_cls)
        for f in dataclasses.fields(section_cls):
            out[f"{section.name}.{f.name}"] = hints[f.name]
    return out


def field_docs() -> dict[str, str]:
    """Docstring of every field (the string literal under it in schema.py or runtime.py), keyed by dotted name."""
    import ast
    import inspect

    from speed_async.config import runtime, schema

    nodes = [node for module in (schema, runtime) for node in ast.parse(inspect.getsource(module)).body]
    docs: dict[str, str] = {}
    for node in nodes:
        if not isinstance(node, ast.ClassDef) or not node.name.endswith("Config") or node.name == "Config":
            continue
        section = node.name.removesuffix("Config").lower()
        body = node.body
        for stmt, nxt in itertools.pairwise(body):
            documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and documented:
                docs[f"{section}.{stmt.target.id}"] = " ".join(str(nxt.value.value).split())
    return docs


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _unknown_key_error(key: str, known: Sequence[str], origin: str) -> ValueError:
    close = difflib.get_close_matches(key, list(known) + list(ALIASES) + list(SWITCHES), n=3, cutoff=0.6)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    section = key.split(".", 1)[0]
    same = sorted(k for k in known if k.startswith(section + "."))
    listing = f" Keys of [{section}]: {', '.join(same)}." if same else f" Sections: {_sections()}."
    return ValueError(f"unknown config key {key!r} (from {origin}){hint}.{listing}")


def _sections() -> str:
    return ", ".join(f.name for f in dataclasses.fields(Config))


def _check_type(key: str, value: Any, hint: Any) -> Any:
    """Return `value` converted to the field's type, or raise a ValueError naming key, value and type."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ValueError(f"{key} = {value!r} is invalid: allowed values are {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{key} = {value!r} is invalid: expected a list of strings")
        return tuple(value)
    if origin is dict:
        if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()
        ):
            raise ValueError(f"{key} = {value!r} is invalid: expected a table of strings")
        return dict(value)
    if origin in (types.UnionType, typing.Union):
        raise AssertionError(f"unsupported annotation for {key}: {hint}")
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{key} = {value!r} is invalid: expected true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{key} = {value!r} is invalid: expected an integer")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"{key} = {value!r} is invalid: expected a number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} = {value!r} is invalid: expected a string")
        return value
    raise AssertionError(f"unsupported annotation for {key}: {hint}")


def _apply_aliases(flat: dict[str, tuple[Any, str]]) -> dict[str, tuple[Any, str]]:
    """Map reference-code names to native keys within one layer; `flat` maps key -> (value, origin)."""
    out: dict[str, tuple[Any, str]] = {}
    named: dict[str, tuple[str, str]] = {}  # native key -> (the name it was set as, its origin)
    for key, (value, origin) in flat.items():
        native = ALIASES.get(key, key)
        if native in out and out[native][0] != value:  # one layer names a key twice (alias and native key)
            other, where = named[native]
            raise ValueError(
                f"{key} = {value!r} (from {origin}) conflicts with {other} = {out[native][0]!r} (from {where}): "
                "set only one of them"
            )
        out[native] = (value, origin if native == key else f"{origin}, as {key}")
        named[native] = (key, origin)
    switches = {k: out.pop(k) for k in SWITCHES if k in out}
    for key, (value, origin) in switches.items():
        if not isinstance(value, bool):
            raise ValueError(f"{key} = {value!r} (from {origin}) is invalid: expected true or false")
    speed = switches.get("curriculum.enable", (None, ""))[0]
    dapo = switches.get("algorithm.filter_groups.enable", (None, ""))[0]
    if speed and dapo:
        raise ValueError(
            "curriculum.enable = true and algorithm.filter_groups.enable = true are both set: SPEED and DAPO "
            "dynamic sampling are alternatives; choose one (curriculum.mode = 'speed' or 'dapo')"
        )
    if speed is None and dapo is None:
        return out
    mode = "speed" if speed else "dapo" if dapo else "none"
    origin = next(iter(switches.values()))[1] + ", as " + " and ".join(switches)
    if "curriculum.mode" in out and out["curriculum.mode"][0] != mode:
        said = " and ".join(f"{k} = {str(v).lower()}" for k, (v, _) in switches.items())
        raise ValueError(
            f"curriculum.mode = {out['curriculum.mode'][0]!r} (from {out['curriculum.mode'][1]}) conflicts with "
            f"{said} (from {origin.split(', as ')[0]}), which means {mode!r}: in one layer (file or command line) "
            "set only one of them"
        )
    out["curriculum.mode"] = (mode, origin)
    return out


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` -> (key, value); the value is read as TOML (`8`, `true`, `["a"]`), else taken as a string."""
    if "=" not in text:
        raise ValueError(f"override {text!r} is invalid: expected key=value, e.g. rollout.n=8")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ValueError(f"override {text!r} has an empty key")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key, value


def merge_layers(layers: Sequence[Mapping[str, tuple[Any, str]]]) -> dict[str, tuple[Any, str]]:
    """The native keys of `layers` (lowest first; each maps a dotted key to (value, origin)), each layer resolved
    on its own (`_apply_aliases`), then merged so that a later layer overrides an earlier one. A
    `rollout.n_continue` that does not fit the final `curriculum.mode` and was set below the layer that chose
    that mode gives way to the mode's default (SPEED's n_continue means nothing in plain groups)."""
    merged: dict[str, tuple[Any, str]] = {}
    layer_of: dict[str, int] = {}
    for index, layer in enumerate(layers):
        for key, entry in _apply_aliases(dict(layer)).items():
            merged[key], layer_of[key] = entry, index
    mode, mode_origin = merged.get("curriculum.mode", ("speed", "default"))
    chosen = f"curriculum.mode = {mode!r} (from {mode_origin})"
    if "rollout.n_continue" in merged and layer_of["rollout.n_continue"] < layer_of.get("curriculum.mode", -1):
        value, origin = merged["rollout.n_continue"]
        if (value == 0) != (mode != "speed"):
            del merged["rollout.n_continue"]
            if mode == "speed":
                return merged  # SPEED's default applies
            merged["rollout.n_continue"] = (0, f"{chosen}, over rollout.n_continue = {value!r} (from {origin})")
    if mode != "speed" and "rollout.n_continue" not in merged:
        # n_continue's default (20) belongs to SPEED; other modes have plain groups unless the user says otherwise.
        merged["rollout.n_continue"] = (0, chosen)
    return merged


def build_config(flat_with_origin: Mapping[str, tuple[Any, str]]) -> Config:
    """Validate dotted keys of one layer (with the origin of each value, for messages) and build the tree."""
    return _build(merge_layers([flat_with_origin]))


def _build(resolved: Mapping[str, tuple[Any, str]]) -> Config:
    types_by_key = field_types()
    sections: dict[str, dict[str, Any]] = {}
    for key, (value, origin) in resolved.items():
        mapping = _mapping_of(key)
        if mapping is not None:
            if not isinstance(value, str):
                raise ValueError(f"{key} = {value!r} is invalid: expected a string (from {origin})")
            section, name = mapping.split(".", 1)
            sections.setdefault(section, {}).setdefault(name, {})[key[len(mapping) + 1 :]] = value
            continue
        if key not in types_by_key:
            raise _unknown_key_error(key, list(types_by_key), origin)
        section, name = key.split(".", 1)
        try:
            sections.setdefault(section, {})[name] = _check_type(key, value, types_by_key[key])
        except ValueError as err:
            raise ValueError(f"{err} (from {origin})") from None
    hints = typing.get_type_hints(Config)
    return Config(**{name: hints[name](**values) for name, values in sections.items()})


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
    """Defaults, then the TOML file at `path` (if any), then `key=value` overrides; validated."""
    return _build(merge_layers(_layers(path, overrides)))


def explain_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> tuple[Config, dict[str, str]]:
    """`load_config(path, overrides)` and, for every native key, the layer that set its value: `default`, the
    file's path or `command line` (with the alias it was set as, or the setting it follows from)."""
    resolved = merge_layers(_layers(path, overrides))
    config = _build(resolved)
    origins = {key: "default" for key in field_types()}
    origins.update({key: origin for key, (_, origin) in resolved.items()})
    for mapping in MAPPINGS:
        entries = [f"{key}: {origin}" for key, (_, origin) in resolved.items() if _mapping_of(key) == mapping]
        if entries:
            origins[mapping] = "; ".join(entries)
    return config, origins


def _layers(path: str | Path | None, overrides: Sequence[str]) -> list[dict[str, tuple[Any, str]]]:
    """The file layer (empty without a file) and the command-line layer."""
    flat: dict[str, tuple[Any, str]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"config file {str(path)!r} does not exist")
        try:
            tree = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ValueError(f"config file {str(path)!r} is not valid TOML: {err}") from None
        flat.update({k: (v, str(path)) for k, v in _flatten(tree).items()})
    command_line: dict[str, tuple[Any, str]] = {}
    for text in overrides:
        key, value = parse_override(text)
        entries = _flatten(value, key + ".") if key in MAPPINGS and isinstance(value, Mapping) else {key: value}
        for entry, entry_value in entries.items():
            command_line.pop(entry, None)  # the same key twice: the last one counts (and keeps its place)
            command_line[entry] = (entry_value, "command line")
    return [flat, command_line]


def config_to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """The resolved tree as plain data (tuples become lists), for `resolved_config.json`."""
    return json.loads(json.dumps(dataclasses.asdict(config)))


def config_from_dict(tree: Mapping[str, Any], origin: str = "resolved config") -> Config:
    """Inverse of `config_to_dict`, with full validation."""
    return build_config({k: (v, origin) for k, v in _flatten(tree).items()})


def write_resolved_config(config: Config, run_dir: str | Path) -> Path:
    """Write `resolved_config.json` into the run directory and return its path."""
    from speed_async.rundir import write_json

    out = Path(run_dir) / "resolved_config.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, config_to_dict(config), indent=2, sort_keys=True)  # atomically: a resume reads it
    return out
