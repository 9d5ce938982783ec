"""Presets (presets/<name>.yaml, docs/presets.md): each validates against the one schema, every key it sets is cited
in docs/presets.md, applying one writes params.yaml atomically and only when valid, incompatible options fail in one
line."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import yaml

from ctm_core.config import ParamsError, load_config
from pipelines.support.presets import apply_preset, list_presets, preset_params, read_preset

ROOT = Path(__file__).resolve().parents[2]
PRESETS = list_presets()


def _leaves(tree: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v and not key.endswith("gan.changes"):
            out.update(_leaves(v, key))
        else:
            out[key] = v
    return out


def test_the_papers_three_recipes_ship():
    assert PRESETS == ["cifar10-cond", "cifar10-uncond", "imagenet64-cond"]


@pytest.mark.parametrize("name", PRESETS)
def test_preset_validates_and_sets_what_it_says(name, tmp_path):
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    params, _ = preset_params(tmp_path / "params.yaml", name)
    dumped = {s: params.section(s) for s in type(params).model_fields}
    for key, value in _leaves(read_preset(name)).items():
        node = dumped
        for part in key.split("."):
            node = node[part]
        assert node == value, key
    d = params.distill
    assert d.distance == "lpips" and d.random_flip and d.gan.enabled and d.mode == "ctm"  # the paper's method


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_value_is_cited_in_the_docs(name):
    """docs/presets.md has a section per preset whose table names every key the preset sets, with its value."""
    doc = (ROOT / "docs" / "presets.md").read_text()
    m = re.search(rf"^### {re.escape(name)}\n(.*?)(?=^### |\Z)", doc, flags=re.S | re.M)
    assert m, f"docs/presets.md: no '### {name}' section"
    section = m.group(1)
    for key, value in _leaves(read_preset(name)).items():
        row = next((ln for ln in section.splitlines() if ln.startswith(f"| `{key}` |")), None)
        assert row is not None, f"{name}: {key} not cited in docs/presets.md"
        shown = yaml.safe_load(row.split("|")[2].strip().strip("`"))
        assert shown == value, f"{name}: {key} documented as {shown!r}, preset has {value!r}"
        assert row.count("|") >= 4 and row.split("|")[3].strip(), f"{name}: {key} has no source"


def test_apply_writes_a_valid_params_file_and_keeps_other_keys_and_comments(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    apply_preset(p, "cifar10-cond", {"data.path": "/data/cifar-10-python.tar.gz"})
    text = p.read_text()
    params = load_config(p)
    assert params.data.path == "/data/cifar-10-python.tar.gz" and params.distill.N == 18
    assert params.likelihood == load_config(ROOT / "params.yaml").likelihood  # untouched section
    assert "# stage: likelihood" in text  # comments of untouched keys survive
    assert "N: 18\n" in text  # a changed value loses the comment written for the old one


def test_invalid_result_leaves_params_file_untouched(tmp_path):
    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    before = p.read_bytes()
    with pytest.raises(ParamsError) as info:
        apply_preset(p, "cifar10-uncond", {"distill.mode": "cm"})  # GAN phase with mode cm
    assert info.value.key == "distill.gan.enabled" and "\n" not in str(info.value)
    with pytest.raises(ParamsError) as info:
        apply_preset(p, "imagenet64-cond", {"distill.lpips.vgg16_sha256": None})  # LPIPS without its weights
    assert info.value.key == "distill.lpips.vgg16_sha256"
    with pytest.raises(ParamsError, match="unknown preset 'nope'"):
        apply_preset(p, "nope")
    assert p.read_bytes() == before and sorted(x.name for x in tmp_path.iterdir()) == ["params.yaml"]


def test_cli_check_and_write(tmp_path, capsys):
    from pipelines.config import _main

    p = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", p)
    assert _main(["--params", str(p), "--preset", "imagenet64-cond", "--check", "--no-env"]) == 0
    assert load_config(p).distill.N == load_config(ROOT / "params.yaml").distill.N  # --check writes nothing
    assert _main(["--params", str(p), "--preset", "imagenet64-cond", "--set", "distill.K=41", "--no-env"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("params error: distill.K: must be < distill.N"), err
    assert _main(["--params", str(p), "--preset", "imagenet64-cond", "--no-env"]) == 0
    assert load_config(p).distill.N == 40


def test_default_run_stays_the_fast_digits_run():
    d = load_config(ROOT / "params.yaml").distill
    assert d.distance == "l2" and not d.random_flip and not d.gan.enabled
