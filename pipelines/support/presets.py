"""The paper's recipes as params.yaml overlays (docs/presets.md): `presets/<name>.yaml` holds the keys a recipe sets.

`apply_preset(params_path, name, overrides)` merges the overlay (then `overrides`, dotted keys) into params.yaml,
validates the result with the one schema (`ctm_core.config`) and only then replaces params.yaml atomically. The
merge is a YAML round trip (ruamel, DVC's own YAML library): keys the preset does not set keep their values and their
comments, so params.yaml stays the single file DVC reads, and `git diff params.yaml` shows what the recipe changed.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ctm_core.config import Params, ParamsError, merge_overrides, read_yaml
from ctm_core.io.atomic import atomic_write
from pipelines.support.params import load_params

__all__ = ["PRESETS_DIR", "apply_preset", "list_presets", "preset_params", "read_preset"]

PRESETS_DIR = Path(__file__).resolve().parents[2] / "presets"


def list_presets(folder: Path = PRESETS_DIR) -> list[str]:
    """Names of the presets shipped in `folder` (`<name>.yaml`), sorted."""
    return sorted(p.stem for p in folder.glob("*.yaml"))


def read_preset(name: str, folder: Path = PRESETS_DIR) -> dict[str, Any]:
    """The overlay of preset `name` (a params-shaped mapping); ParamsError naming the known presets otherwise."""
    names = list_presets(folder)
    if name not in names:
        raise ParamsError("--preset", f"unknown preset {name[:80]!r} (expected one of: {', '.join(names)})")
    raw = read_yaml(folder / f"{name}.yaml", f"preset {name}")
    if not isinstance(raw, dict):
        raise ParamsError(f"preset {name}", f"expected a mapping of params sections, got {type(raw).__name__}")
    return raw


def _merge_into(node, overlay: Mapping[str, Any]) -> None:
    """Set every leaf of `overlay` in the round-trip mapping `node` (mappings merge, lists and scalars replace).

    A value that changes loses its end-of-line comment (written for the old value); full-line comments stay."""
    for key, value in overlay.items():
        if isinstance(value, Mapping) and value and isinstance(node.get(key), Mapping):
            _merge_into(node[key], value)
            continue
        if key in node and node[key] == value:
            continue  # unchanged: keep how params.yaml writes it (4.0e-4 stays 4.0e-4)
        if key in node:
            _drop_eol_comment(node, key)
        node[key] = _flow_lists(value)


def _flow_lists(value: Any) -> Any:
    """Lists written inline (`[0.999, 0.9999]`), as params.yaml writes them."""
    from ruamel.yaml.comments import CommentedSeq

    if isinstance(value, list):
        seq = CommentedSeq(value)
        seq.fa.set_flow_style()
        return seq
    return value


def _drop_eol_comment(node, key: str) -> None:
    """Remove the comment after `key`'s value on its line, keeping any full-line comments that follow it."""
    tokens = getattr(getattr(node, "ca", None), "items", {}).get(key)
    if not tokens or len(tokens) < 3 or tokens[2] is None:
        return
    text = tokens[2].value
    rest = text.split("\n", 1)[1] if "\n" in text else ""
    if rest.strip():
        tokens[2].value = "\n" + rest
    else:
        tokens[2] = None


def _nested(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Dotted overrides ({'distill.K': 8}) as one nested mapping."""
    return merge_overrides({}, overrides)


def preset_params(
    params_path: str | os.PathLike[str], name: str, overrides: Mapping[str, Any] | None = None, *, check_env=False
) -> tuple[Params, str]:
    """(validated Params, the params.yaml text) of `params_path` with preset `name` and `overrides` applied;
    nothing is written. Raises ParamsError (one line naming the key)."""
    from ruamel.yaml import YAML

    params_path = Path(params_path)
    yaml = YAML()  # round trip: comments and key order survive
    yaml.width = 4096  # never fold a long URI onto the next line
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )  # `null`, as params.yaml writes it
    tree = yaml.load(params_path.read_text(encoding="utf-8"))
    _merge_into(tree, read_preset(name))
    if overrides:
        _merge_into(tree, _nested(overrides))
    buf = io.StringIO()
    yaml.dump(tree, buf)
    text = buf.getvalue()
    # Validate the exact text, from the params file's folder (relative paths resolve against it).
    fd, tmp = tempfile.mkstemp(prefix=".params-preset-", suffix=".yaml", dir=params_path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        params = load_params(tmp, check_env=check_env)
    finally:
        os.unlink(tmp)
    params._repo_root = params_path.resolve().parent
    return params, text


def apply_preset(
    params_path: str | os.PathLike[str], name: str, overrides: Mapping[str, Any] | None = None, *, check_env=False
) -> Params:
    """Write params.yaml with preset `name` (+ `overrides`) applied, atomically and only when it validates."""
    params, text = preset_params(params_path, name, overrides, check_env=check_env)
    atomic_write(params_path, lambda f: f.write(text.encode("utf-8")))
    return params
