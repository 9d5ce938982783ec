"""The Python files each DVC stage runs: the import closure of its `python -m pipelines.<stage>` module.

A stage's code dependencies in dvc.yaml must be exactly these files, listed one by one, so that editing the
evaluation code re-runs `evaluate` but never `teacher` (docs/pipeline.md). The closure follows every `import` /
`from ... import` of a project module (`ctm_core`, `pipelines`) anywhere in a file, function bodies included, plus
the `__init__.py` of every enclosing package (Python runs them on import); imports under `if TYPE_CHECKING:` are
not run and do not count.

    python tools/dvc_deps.py            # print each stage's expected code deps
    python tools/dvc_deps.py --check    # exit 1 and list the differences with dvc.yaml
    python tools/dvc_deps.py --write    # rewrite the code deps in dvc.yaml (other deps and comments kept)
"""

from __future__ import annotations

import argparse
import ast
import re
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ctm_core", "pipelines")
_CMD_RE = re.compile(r"python -m (pipelines\.\w+)")


def module_file(module: str, root: Path = ROOT) -> Path | None:
    """`a.b.c` -> a/b/c.py or a/b/c/__init__.py under `root`; None when it is not a project module."""
    if module.split(".")[0] not in PACKAGES:
        return None
    base = root.joinpath(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def lazy_exports(package: str, root: Path = ROOT) -> dict[str, str]:
    """A package's literal `_EXPORTS = {name: module}` (lazy public names, see ctm_core/__init__.py), else {}."""
    init = module_file(package, root)
    if init is None or init.name != "__init__.py":
        return {}
    for node in ast.parse(init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value)
    return {}


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _runtime_nodes(tree: ast.AST):
    """Every node of `tree` except the bodies of `if TYPE_CHECKING:` (imports for type checkers only)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))


def _imported_modules(path: Path, module: str, root: Path = ROOT) -> set[str]:
    """Every project module `path` imports (absolute or relative), anywhere in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
            found.add(target)
            exports = lazy_exports(target, root)
            for alias in node.names:
                found.add(f"{target}.{alias.name}")  # `from pkg import submodule`
                if alias.name in exports:  # `from ctm_core import CTMStudent` loads ctm_core.nets.student
                    found.add(exports[alias.name])
    return {m for m in found if module_file(m, root) is not None}


def closure(module: str, root: Path = ROOT) -> set[str]:
    """Repo-relative paths of every project file that running `module` imports (transitively)."""
    seen: set[str] = set()
    todo = [module]
    files: set[str] = set()
    while todo:
        mod = todo.pop()
        if mod in seen:
            continue
        seen.add(mod)
        path = module_file(mod, root)
        if path is None:
            continue
        files.add(path.relative_to(root).as_posix())
        parts = mod.split(".")
        todo.extend(".".join(parts[:i]) for i in range(1, len(parts)))  # enclosing packages' __init__.py
        todo.extend(_imported_modules(path, mod, root))
    return files


def stage_modules(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, str]:
    """stage name -> the `pipelines.<stage>` module its cmd runs."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, stage in stages.items():
        match = _CMD_RE.search(" ".join(stage["cmd"]) if isinstance(stage["cmd"], list) else stage["cmd"])
        if match:
            out[name] = match.group(1)
    return out


def declared_code_deps(stage: dict) -> set[str]:
    """The deps of a stage that are project code (files or folders under ctm_core/ or pipelines/)."""
    deps = [d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])]
    return {d.rstrip("/") for d in deps if d.split("/")[0] in PACKAGES}


def differences(root: Path = ROOT) -> dict[str, tuple[list[str], list[str]]]:
    """stage -> (missing from dvc.yaml, listed but not imported); only stages that differ."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, module in stage_modules(root / "dvc.yaml").items():
        want, have = closure(module, root), declared_code_deps(stages[name])
        if want != have:
            out[name] = (sorted(want - have), sorted(have - want))
    return out


def write_deps(dvc_yaml: Path = ROOT / "dvc.yaml", root: Path = ROOT) -> bool:
    """Replace each stage's code deps in `dvc_yaml` by its closure, in place (text edit: comments and the other
    deps stay). Returns True when the file changed."""
    modules = stage_modules(dvc_yaml)
    lines = dvc_yaml.read_text(encoding="utf-8").split("\n")
    out: list[str] = []
    stage, i = None, 0
    while i < len(lines):
        line = lines[i]
        match = re.match(r"^  (\w+):\s*$", line)
        if match and match.group(1) in modules:
            stage = match.group(1)
        if stage and re.match(r"^    deps:\s*$", line):
            out.append(line)
            i += 1
            other = []
            while i < len(lines) and re.match(r"^      - ", lines[i]):
                item = lines[i].strip()[2:].split("#")[0].strip()
                if item.split("/")[0] not in PACKAGES:
                    other.append(lines[i])
                i += 1
            out.extend(f"      - {f}" for f in sorted(closure(modules[stage], root)))
            out.extend(other)
            stage = None
            continue
        out.append(line)
        i += 1
    text = "\n".join(out)
    changed = text != dvc_yaml.read_text(encoding="utf-8")
    if changed:
        tmp = dvc_yaml.with_name(dvc_yaml.name + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(dvc_yaml)
    return changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="compare with dvc.yaml; exit 1 on any difference")
    ap.add_argument("--write", action="store_true", help="rewrite the code deps in dvc.yaml")
    args = ap.parse_args(argv)
    if args.write:
        print("dvc.yaml updated" if write_deps() else "dvc.yaml already up to date")
        return 0
    if not args.check:
        for name, module in stage_modules().items():
            print(f"{name}:")
            print("\n".join(f"  - {f}" for f in sorted(closure(module))))
        return 0
    diff = differences()
    for name, (missing, extra) in diff.items():
        for f in missing:
            print(f"{name}: missing dep {f}")
        for f in extra:
            print(f"{name}: extra dep {f} (not imported by the stage)")
    return 1 if diff else 0


if __name__ == "__main__":
    sys.exit(main())
