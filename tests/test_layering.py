"""The package reads one way: data, models → rollout → reward_actors → learner → orchestration, with eval (the
papers' metrics and figures) below orchestration. Checked on the import statements of every module."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "radrl"

# subpackage (or top-level module) → radrl subpackages it must not import
FORBIDDEN = {
    "data": {"models", "rollout", "reward_actors", "learner", "orchestration", "eval"},
    "models": {"rollout", "reward_actors", "learner", "orchestration", "eval"},
    "rollout": {"reward_actors", "learner", "orchestration", "eval"},
    "reward_actors": {"learner", "orchestration", "eval"},
    "learner": {"orchestration", "eval"},
    "eval": {"orchestration", "export"},
    "export": {"orchestration"},
    "checkpoints": {"orchestration", "eval"},
    "faults": {"orchestration", "eval"},
}


def radrl_imports(path: Path) -> set[str]:
    """The radrl subpackages a module imports (at any depth of its code, deferred imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else []
        found |= {name.split(".")[1] for name in names if name.startswith("radrl.")}
    return found


def test_no_module_imports_a_layer_above_it():
    broken = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for imported in radrl_imports(path) & FORBIDDEN.get(layer, set()):
            broken.append(f"{path.relative_to(PACKAGE)} imports radrl.{imported}")
    assert not broken, broken
