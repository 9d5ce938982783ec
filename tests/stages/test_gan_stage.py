"""The distill stage with the GAN phase on (docs/gan.md): two Ray runs, W=1 ≡ W=2, re-run resumes, bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ctm_core.config import ParamsError, gan_phases
from tests.stages.test_distill import _cli, _params, _weights, inputs  # noqa: F401 - `inputs` is a fixture

GAN = {
    "ray.dashboard_port": 8297,  # not test_distill's: the two modules may run side by side
    "distill.gan.enabled": True,
    "distill.gan.steps": 4,
    "distill.gan.scratch_channels": 8,
    "distill.gan.changes": {"K": 3},
}


@pytest.mark.slow
@pytest.mark.ray
def test_gan_phase_two_workers_equal_one_and_rerun_resumes(inputs, monkeypatch):  # noqa: F811
    from pipelines.distill import run_distill
    from pipelines.support.distill_run import run_name

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    runs = {}
    for w in (1, 2):
        runs[w] = run_distill(
            _params(inputs, f"gan{w}", **GAN),
            data_dir=str(inputs / "data"),
            teacher_dir=str(inputs / "teacher"),
            out_dir=str(inputs / f"g{w}"),
            num_workers=w,
        )
    one, two = runs[1], runs[2]
    assert one["steps"] == two["steps"] == 8  # distill.steps 4 + gan.steps 4
    assert one["ray_run_name"].startswith("distill-gan-") and one["ctm_dsm_phase"]["steps"] == 4
    # Phase 1 is the run a GAN-less section names: switching the GAN phase on reuses a finished CTM+DSM run.
    plain = _params(inputs, "gan1")
    assert gan_phases(plain.distill)[0] == gan_phases(_params(inputs, "gan1", **GAN).distill)[0]
    assert one["ctm_dsm_phase"]["ray_run_name"].startswith("distill-") and run_name  # named like any distill run
    w1, w2 = _weights(inputs / "g1"), _weights(inputs / "g2")
    for name in w1:
        torch.testing.assert_close(w2[name], w1[name], rtol=1e-5, atol=1e-6, msg=name)
    # The GAN phase moved the weights beyond phase 1's end.
    from ctm_core.training.loop import load_checkpoint_file

    p1 = load_checkpoint_file(Path(one["ctm_dsm_phase"]["checkpoint_path"]) / "trainer_state.pt")
    assert p1["discriminator"] is None and p1["step"] == 4
    assert any(not torch.equal(p1["model"][k], w1[k]) for k in w1 if not k.endswith("resample_filter"))

    again = run_distill(
        _params(inputs, "gan2", **GAN),
        data_dir=str(inputs / "data"),
        teacher_dir=str(inputs / "teacher"),
        out_dir=str(inputs / "g2b"),
        num_workers=2,
    )
    assert again["ray_run_name"] == two["ray_run_name"] and again["mlflow_run_id"] == two["mlflow_run_id"]
    for name, v in _weights(inputs / "g2b").items():
        assert torch.equal(v, w2[name]), name
    assert json.loads((inputs / "g2" / "run.json").read_text())["ctm_dsm_phase"]["steps"] == 4


def test_gan_with_cm_mode_fails_in_one_line_before_ray(inputs, tmp_path):  # noqa: F811
    root = Path(__file__).resolve().parents[2]
    best = tmp_path / "best.yaml"
    best.write_text("distill:\n  mode: cm\n  gan:\n    enabled: true\n")
    args = ["--params", str(root / "params.yaml"), "--best-params", str(best)]
    r = _cli([*args, "--data", str(inputs / "data"), "--teacher", str(inputs / "teacher")], tmp_path)
    assert r.returncode == 2, r.stderr
    err = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("ERROR pipelines.distill: distill.gan.enabled:"), r.stderr
    assert "mode 'cm'" in err[0] and not (tmp_path / "ray_results").exists()


def test_projected_needs_rgb_and_pins(inputs):  # noqa: F811
    from ctm_core.data.prepared import load_card
    from pipelines.support.gan_phase import check_gan_phase

    with pytest.raises(ParamsError) as info:
        _params(inputs, "unused", **GAN, **{"distill.gan.discriminator": "projected"})
    assert info.value.key == "distill.gan.deit.sha256"
    pinned = {"distill.gan.deit.sha256": "record", "distill.gan.efficientnet.sha256": "record"}
    params = _params(inputs, "unused", **GAN, **{"distill.gan.discriminator": "projected"}, **pinned)
    with pytest.raises(ParamsError, match="1-channel data") as info:
        check_gan_phase(params, load_card(inputs / "data"))  # digits are grey: refused before any fetch or Ray
    assert info.value.key == "distill.gan.discriminator"


def test_feature_networks_fetched_with_pins(inputs, tmp_path):  # noqa: F811
    """`record` fetches each file once and puts its digest into the section (the run identity names the bytes);
    a wrong pin is refused before Ray, nothing of it left in the cache."""
    import hashlib

    from pipelines.support.fetch import ChecksumMismatchError
    from pipelines.support.gan_phase import fetch_feature_networks

    files = {}
    for name in ("deit", "efficientnet"):
        files[name] = tmp_path / f"{name}.pth"
        torch.save({"w": torch.full((2,), float(len(name)))}, files[name])
    edits = {**GAN, "distill.gan.discriminator": "projected", "distill.gan.cache_dir": str(tmp_path / "cache")}
    for name, f in files.items():
        edits[f"distill.gan.{name}.source"] = str(f)
        edits[f"distill.gan.{name}.sha256"] = "record"
    pinned, weights = fetch_feature_networks(_params(inputs, "unused", **edits))
    for name, f in files.items():
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        assert getattr(pinned.distill.gan, name).sha256 == digest
        assert Path(weights[{"deit": "deit_base_distilled_patch16_224"}.get(name, "tf_efficientnet_lite0")]).is_file()
    edits["distill.gan.deit.sha256"] = "0" * 64
    with pytest.raises(ChecksumMismatchError):
        fetch_feature_networks(_params(inputs, "unused", **edits))
    scratch = _params(inputs, "unused", **GAN)
    assert fetch_feature_networks(scratch) == (scratch, None)  # offline: nothing fetched
