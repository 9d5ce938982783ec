"""DVC deps correct by construction: each stage's code deps in dvc.yaml are exactly the import closure of the module
its cmd runs (tools/dvc_deps.py), listed file by file, so editing the evaluation code re-runs `evaluate` and never
`teacher`. The closure is checked first on a small synthetic project whose answer is known, then on the repository;
the same closure shows that no stage imports another and that stage files stay thin.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import yaml

from tools import dvc_deps

ROOT = Path(__file__).resolve().parents[2]
MAX_STAGE_LINES = 220  # "about 200": parse args, load config, build, call the library, write outputs

# A mini project: every way a project module can be reached (absolute, `from pkg import submodule`, relative at
# levels 1 and 2, inside a function body, a lazy `_EXPORTS` name of a package __init__), plus files nobody imports.
MINI = {
    "ctm_core/__init__.py": """
        '''Lazy public names: nothing imported until used.'''
        _EXPORTS = {"Thing": "ctm_core.nets.thing", "Other": "ctm_core.nets.other"}
        """,
    "ctm_core/errors.py": "class InputError(ValueError): ...",
    "ctm_core/nets/__init__.py": "",
    "ctm_core/nets/base.py": "import math\n\nclass Base: ...",
    "ctm_core/nets/thing.py": "from .base import Base\n\nclass Thing(Base): ...",
    "ctm_core/nets/other.py": "class Other: ...",
    "ctm_core/eval/__init__.py": "",
    "ctm_core/eval/metrics.py": """
        import numpy as np

        from ..errors import InputError

        def score(x):
            from ctm_core.io import hashing  # function-level: still a dependency

            return hashing.digest(x)
        """,
    "ctm_core/io/__init__.py": "",
    "ctm_core/io/hashing.py": "def digest(x): ...",
    "ctm_core/io/unused.py": "",
    "pipelines/__init__.py": "",
    "pipelines/support/__init__.py": "",
    "pipelines/support/helpers.py": "import ctm_core.eval.metrics",
    "pipelines/stage_a.py": """
        from ctm_core import Thing
        from pipelines.support import helpers

        def main():
            return helpers, Thing
        """,
    "pipelines/stage_b.py": "from ctm_core.io.hashing import digest",
}
STAGE_A = {
    "pipelines/__init__.py",
    "pipelines/stage_a.py",
    "pipelines/support/__init__.py",
    "pipelines/support/helpers.py",
    "ctm_core/__init__.py",
    "ctm_core/nets/__init__.py",
    "ctm_core/nets/thing.py",  # the lazy export `Thing`
    "ctm_core/nets/base.py",  # relative, level 1
    "ctm_core/eval/__init__.py",
    "ctm_core/eval/metrics.py",
    "ctm_core/errors.py",  # relative, level 2
    "ctm_core/io/__init__.py",
    "ctm_core/io/hashing.py",  # inside a function body
}
STAGE_B = {"pipelines/__init__.py", "pipelines/stage_b.py", "ctm_core/__init__.py"} | {
    "ctm_core/io/__init__.py",
    "ctm_core/io/hashing.py",
}


def _mini_project(root: Path) -> Path:
    for rel, text in MINI.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text).lstrip())
    stages = {
        "a": {"cmd": "python -m pipelines.stage_a --out out/a", "deps": ["params.yaml", *sorted(STAGE_A)]},
        "b": {"cmd": ["python -m pipelines.stage_b", "touch out/b"], "deps": [{"data/raw": None}, *sorted(STAGE_B)]},
        "fetch": {"cmd": "curl -o data/raw https://example.org/raw", "outs": ["data/raw"]},
    }
    (root / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    return root


def _repo_stages() -> dict[str, str]:
    return dvc_deps.stage_modules(ROOT / "dvc.yaml")


def test_closure_of_a_mini_project(tmp_path):
    root = _mini_project(tmp_path)
    assert dvc_deps.closure("pipelines.stage_a", root) == STAGE_A
    assert dvc_deps.closure("pipelines.stage_b", root) == STAGE_B
    assert dvc_deps.stage_modules(root / "dvc.yaml") == {"a": "pipelines.stage_a", "b": "pipelines.stage_b"}
    assert dvc_deps.differences(root) == {}


def test_an_added_import_changes_the_closure_and_is_reported(tmp_path):
    root = _mini_project(tmp_path)
    helpers = root / "pipelines" / "support" / "helpers.py"
    helpers.write_text(helpers.read_text() + "\n\ndef later():\n    from ctm_core.io import unused\n")
    assert dvc_deps.closure("pipelines.stage_a", root) == STAGE_A | {"ctm_core/io/unused.py"}
    assert dvc_deps.differences(root) == {"a": (["ctm_core/io/unused.py"], [])}
    # and the other way round: a dep that is no longer imported is reported as extra
    (root / "ctm_core" / "nets" / "thing.py").write_text("class Thing: ...\n")
    assert dvc_deps.differences(root)["a"] == (["ctm_core/io/unused.py"], ["ctm_core/nets/base.py"])


def test_dvc_yaml_code_deps_are_the_import_closures():
    diff = dvc_deps.differences(ROOT)
    lines = [f"{stage}: missing dep {f}" for stage, (missing, _) in diff.items() for f in missing]
    lines += [f"{stage}: extra dep {f} (not imported)" for stage, (_, extra) in diff.items() for f in extra]
    assert not diff, "dvc.yaml deps differ from the import closures (python tools/dvc_deps.py):\n" + "\n".join(lines)


def test_no_stage_imports_another_stage():
    stages = _repo_stages()
    assert {"prepare", "teacher", "distill", "evaluate"} <= set(stages), stages
    stage_files = {name: dvc_deps.module_file(module).relative_to(ROOT).as_posix() for name, module in stages.items()}
    found = {}
    for name, module in stages.items():
        others = set(stage_files.values()) - {stage_files[name]}
        if hit := sorted(dvc_deps.closure(module) & others):
            found[name] = hit
    assert not found, f"stages importing other stage modules (move the shared code to pipelines/support/): {found}"


def test_stage_files_are_thin():
    too_long = {}
    for module in _repo_stages().values():
        path = dvc_deps.module_file(module)
        if (n := len(path.read_text(encoding="utf-8").splitlines())) > MAX_STAGE_LINES:
            too_long[path.relative_to(ROOT).as_posix()] = n
    assert not too_long, f"stage files over {MAX_STAGE_LINES} lines: {too_long}"
