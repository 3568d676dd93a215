"""The layering rules of DESIGN.md that an import can check: the pure layers (the math, the matcher, the metrics,
the triggers) load without Ray, and the stages never import the pipelines."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "otc_ray"
PURE = ("otc_ray.rematch.matcher", "otc_ray.rematch.gates", "otc_ray.rematch", "otc_ray.evaluate",
        "otc_ray.evaluate.report", "otc_ray.ot", "otc_ray.losses", "otc_ray.model", "otc_ray.poison.triggers",
        "otc_ray.poison", "otc_ray.data.schema", "otc_ray.config")

_NO_RAY = """
import importlib
import sys


class NoRay:
    def find_spec(self, name, path=None, target=None):
        if name == "ray" or name.startswith("ray."):
            raise ImportError(f"{name} is blocked: a pure module must not import Ray")
        return None


blocker = NoRay()
sys.meta_path.insert(0, blocker)
for name in sys.argv[1:]:
    importlib.import_module(name)
from otc_ray.rematch.matcher import match_block  # noqa: F401  (the import the issue names)
loaded = sorted(m for m in sys.modules if m == "ray" or m.startswith("ray."))
assert not loaded, loaded
# the Ray parts of otc_ray.rematch load on first use of one of their names
sys.meta_path.remove(blocker)
import otc_ray.rematch as rematch
assert "otc_ray.rematch.stage" not in sys.modules
assert callable(rematch.add_rematch_stage) and "otc_ray.rematch.stage" in sys.modules
print("ok")
"""


def test_pure_modules_import_without_ray_and_rematch_loads_its_ray_parts_lazily():
    out = subprocess.run([sys.executable, "-c", _NO_RAY, *PURE], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def _imports(path: Path) -> set[str]:
    """Absolute names of the otc_ray modules a file imports (relative imports resolved)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]                     # the package a relative import starts from
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out |= {f"{module}.{a.name}" for a in node.names}
    return {m for m in out if m.startswith("otc_ray")}


def test_stages_never_import_the_pipelines():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE)
        if rel.parts[0] == "pipelines" or rel.name in ("cli.py", "__main__.py"):
            continue
        hits = sorted(m for m in _imports(path) if m == "otc_ray.pipelines" or m.startswith("otc_ray.pipelines."))
        if hits:
            offenders.append(f"{rel}: {hits}")
    assert not offenders, offenders


def test_demo_config_is_package_data():
    """The demo reads its config from inside the package, which pyproject's package-data ships."""
    import tomllib

    from otc_ray.pipelines.demo import DEMO_CONFIG

    assert DEMO_CONFIG.is_file() and PACKAGE in DEMO_CONFIG.parents
    globs = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["otc_ray"]
    assert any(DEMO_CONFIG.relative_to(PACKAGE).match(g) for g in globs), globs
