"""The layering rules of DESIGN.md that an import can check: the pure layers (the math, the matcher, the metrics,
the triggers) load without Ray, the stages never import the pipelines, no stage reaches into another stage that it
must not know (`FORBIDDEN`), and the package's imports form no cycle. Imports are read from the source (ast), every
one of them, those inside functions included."""
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


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _is_within(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def _module_imports(path: Path) -> set[str]:
    """The otc_ray modules a file depends on: `import a.b` counts as a.b; `from X import n` as X.n when that is a
    module (`from . import schema`: schema, not the package's __init__, which its own submodules would otherwise
    always form a cycle with), else as X."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    package = parts[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
        elif isinstance(node, ast.ImportFrom):
            base = list(package[:len(package) - node.level + 1]) if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                out |= {sub} if sub in MODULES else {module} if module in MODULES else set()
    return out - {_module_name(path)}


# (importer, imported, why): the importer's modules never import the imported ones
FORBIDDEN = (
    ("otc_ray.config", "otc_ray", "the config is the bottom layer: every stage reads it, it reads none"),
    ("otc_ray.train", "otc_ray.poison", "training takes class patterns and named classes from the data layer "
                                         "(otc_ray.data.class_info), not from the attack"),
    ("otc_ray.rematch", "otc_ray.train", "the re-match stage does not know its consumer (the checkpoint file name "
                                         "comes from otc_ray.model_checkpoint)"),
    ("otc_ray.evaluate", "otc_ray.data.builtin", "metrics take arrays and class lists (otc_ray.data.class_info), not "
                                                 "the built-in data generators"),
    ("otc_ray.train", "otc_ray.data.builtin", "the trainer reads shards; built-in sets are made by the pipelines"),
    ("otc_ray.rematch", "otc_ray.data.builtin", "the matcher reads rows, whatever made them"),
    ("otc_ray.track", "otc_ray.train", "tracking logs what it is given"),
)


def test_no_stage_imports_what_it_must_not_know():
    offenders = []
    for name, path in MODULES.items():
        for importer, imported, why in FORBIDDEN:
            if not _is_within(name, importer):
                continue
            hits = sorted(m for m in _module_imports(path) if _is_within(m, imported))
            if hits:
                offenders.append(f"{name} imports {hits}: {why}")
    assert not offenders, "\n".join(offenders)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index, low, on_stack, stack, out = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_package_imports_form_no_cycle():
    graph = {name: _module_imports(path) for name, path in MODULES.items()}
    assert graph["otc_ray.credentials"] and "otc_ray.config" in graph["otc_ray.credentials"], "the graph is read"
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]], "the check finds one"
    assert not _cycles(graph), _cycles(graph)


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


def test_the_demo_names_the_attacks_none_did_not_learn():
    """After `none` trains, the demo says which of its attacks it did not learn (their defended ASRs measure
    nothing): backdoor ASR below 0.9, targeted ASR at most 1/16; a learnt attack, or one not configured, is silent."""
    from otc_ray.config import load_config
    from otc_ray.pipelines.demo import DEMO_CONFIG, unlearnt_attacks
    from otc_ray.track import metric_names

    cfg = load_config(DEMO_CONFIG, [])
    learnt = {metric_names.FINAL_BACKDOOR_ASR: 0.99, metric_names.FINAL_TARGETED_ASR: 0.25}
    assert unlearnt_attacks(cfg, learnt) == []
    lines = unlearnt_attacks(cfg, {metric_names.FINAL_BACKDOOR_ASR: 0.04, metric_names.FINAL_TARGETED_ASR: 0.0625})
    assert len(lines) == 2 and "backdoor (patch -> sneaker): ASR 0.040 < 0.9" in lines[0]
    assert "targeted attack: ASR 0.062 <= 0.0625" in lines[1]
    backdoor_only = load_config(DEMO_CONFIG, ["poison.attack=backdoor"])
    assert unlearnt_attacks(backdoor_only, {metric_names.FINAL_BACKDOOR_ASR: 0.99}) == []
