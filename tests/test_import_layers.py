"""The package's layering rules (ARCHITECTURE.md), executable: a breach fails here, not in review."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE = REPO / "speed_async"

# Lower layers never import higher ones. Every top-level module of the package must be listed.
LAYERS: dict[str, int] = {
    "config": 0,
    "protocol": 0,
    "rundir": 0,
    "lifetime": 0,
    "data": 1,
    "rewards": 1,
    "algorithms": 1,
    "transport": 1,
    "metrics": 1,
    "accounting": 1,
    "curriculum": 2,
    "weight_sync": 2,
    "tiny": 2,
    "sampler": 3,
    "orchestrator": 3,
    "learner": 4,
    "cli": 5,
    "__main__": 5,
}
NO_TORCH = ("config", "protocol", "rewards")
VLLM_ONLY_IN = ("speed_async/sampler/engine.py", "speed_async/sampler/transfer_engine.py")
"""The engine wrapper and the weight-transfer engine it registers in vLLM (which subclasses vLLM's base class)."""
ORCHESTRATOR_CALLED_FROM = "speed_async/learner/head.py"
"""The one narrow call between learner and orchestrator points from the learner (rank 0's Head) to the
orchestrator: no other learner module imports it, and the orchestrator never imports the learner."""
FSDP_ONLY_UNDER = "speed_async/learner/"


def _component(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "speed_async" and len(parts) > 1 else None


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module imported anywhere in the file (function-local imports included), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package_parts = path.relative_to(REPO).with_suffix("").parts[:-1]
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package_parts[: len(package_parts) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def _source_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_every_component_has_a_layer() -> None:
    components = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in _source_files()}
    components.discard("__init__")
    missing = sorted(components - set(LAYERS))
    assert not missing, f"assign a layer in tests/test_import_layers.py to: {missing}"


def test_layers_and_forbidden_imports() -> None:
    breaches: list[str] = []
    for path in _source_files():
        rel = path.relative_to(REPO).as_posix()
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for line, module in _imports(path):
            where = f"{rel}:{line} imports {module}"
            target = _component(module)
            if target is not None and target in LAYERS and target != own:
                if LAYERS[target] > LAYERS[own]:
                    breaches.append(f"{where}: layer {own} ({LAYERS[own]}) < {target} ({LAYERS[target]})")
                if "sampler" in (own, target) and {own, target} & {"learner", "orchestrator"}:
                    breaches.append(f"{where}: the sampler and the learner or orchestrator never import each other")
                if (own, target) == ("learner", "orchestrator") and rel != ORCHESTRATOR_CALLED_FROM:
                    breaches.append(f"{where}: only {ORCHESTRATOR_CALLED_FROM} calls into the orchestrator")
            top = module.split(".")[0]
            if top == "vllm" and rel not in VLLM_ONLY_IN:
                breaches.append(f"{where}: only {' and '.join(VLLM_ONLY_IN)} import vllm")
            if top == "torch" and own in NO_TORCH:
                breaches.append(f"{where}: {own} must not import torch")
            if "fsdp" in module.split(".") and not rel.startswith(FSDP_ONLY_UNDER):
                breaches.append(f"{where}: FSDP code lives only under {FSDP_ONLY_UNDER}")
            if top == "pickle" or top == "cloudpickle":
                breaches.append(f"{where}: no pickle in the package (msgpack only on the wire)")
    assert not breaches, "\n".join(breaches)


@pytest.mark.parametrize(
    "module", ["speed_async.config", "speed_async.protocol", "speed_async.rewards", "speed_async.cli"]
)
def test_light_modules_do_not_pull_torch_or_vllm(module: str) -> None:
    # Transitive check in a fresh interpreter: what the static walk cannot see (third-party imports of torch).
    code = f"import sys, {module}; bad = [m for m in ('torch', 'vllm') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]", f"{module} pulls in {out.stdout.strip()}"
