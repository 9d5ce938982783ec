"""MLflow model registry operations of the register stage: the student folder's identity, the pyfunc model version
(logged once per student weights), the run it is logged into, the champion lookup and the alias moves.

The model is logged from code (MLflow models-from-code: `ENTRY_FILE`, written here, calls `mlflow.models.set_model`),
so loading it unpickles nothing. Loading any MLflow model still imports the Python files shipped inside it, so every
file is pinned: the entry checks the shipped `code/` against digests written into it, the sampler checks the student
folder against digests in `model_config`, and the registry holds the root of trust: `MANIFEST_FILE` lists the sha256
of every other file of the logged model and the version's tag `MANIFEST_TAG` holds the manifest's own sha256.
Checks inside the model cannot catch an edit of themselves (the edited file decides); `verify_registered_model`
checks the downloaded files against the tag before anything of the model runs: load the folder it returns.

The promotion decision itself is `pipelines.support.gate` (pure); this module only reads and writes the registry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ctm_core.config import Params
from ctm_core.redact import redact_text, redact_uri
from pipelines.support.gate import Decision, Evidence, metric_noise
from pipelines.support.io_utils import read_json

__all__ = [
    "DECISION_TAG",
    "ENTRY_FILE",
    "EVAL_STATUS_TAG",
    "MANIFEST_FILE",
    "MANIFEST_TAG",
    "MODEL_ARTIFACT_NAME",
    "PROTOCOL_TAG",
    "SHAPE_TAG",
    "STUDENT_TAG",
    "check_image_shape",
    "RegisterError",
    "apply_decision",
    "champion_evidence",
    "champion_version",
    "float_tag",
    "headline_metric_tags",
    "image_shape",
    "log_decision",
    "log_model_version",
    "metric_tags",
    "provenance",
    "student_for",
    "student_info",
    "target_run",
    "verify_registered_model",
]

logger = logging.getLogger(__name__)

MODEL_ARTIFACT_NAME = "ctm_sampler"  # name= of the logged model inside the run
STUDENT_TAG = "ctm.student_sha256"
EVAL_STATUS_TAG = "ctm.eval_status"
PROTOCOL_TAG = "eval.protocol_sha256"
DECISION_TAG = "ctm.decision"
SHAPE_TAG = "image.shape"  # HxWxC of the images the version draws; one registered name holds one shape
MANIFEST_TAG = "ctm.manifest_sha256"  # sha256 of MANIFEST_FILE: the digest every other file is checked against
MANIFEST_FILE = "ctm_manifest.json"  # {relative path: sha256} of every other file of the logged model
ENTRY_FILE = "ctm_sampler_entry.py"  # the models-from-code file (lands at the model's root)
# MLflow writes this file ({model_name, model_version}, YAML, read by nothing that runs) into the model folder on every
# models:/ download; with a local artifact store that folder is the store itself (mlflow/store/artifact/
# models_artifact_repo.py `_add_registered_model_meta_file`), so after one `mlflow models serve -m models:/...` it
# is there for good. It is the one file a verified folder may hold beyond the manifest.
MLFLOW_DOWNLOAD_META = "registered_model_meta"
# Keys looked up in the student's config.json `meta` (written by the distill stage) for the provenance tags.
_META_KEYS = {
    "data.hash": ("data_hash", "data_sha256", "data_md5"),
    "teacher.hash": ("teacher_weights_sha256", "teacher_sha256", "teacher_hash"),
}


class RegisterError(RuntimeError):
    """The stage cannot register; the message is one line naming the problem and the fix."""


# --- the student folder -----------------------------------------------------------------------------------------------
def student_info(student_dir: str | os.PathLike[str], variant: str | None) -> dict[str, Any]:
    """{'config', 'variant', 'sha256' (identity of variant + weights), 'weights_sha256', 'run' (run.json)} of the
    student folder; `variant` None picks the first EMA variant, else 'online'. Raises RegisterError."""
    from ctm_core.io.student_format import read_student_config

    folder = Path(student_dir)
    try:
        config = read_student_config(folder)
    except (FileNotFoundError, ValueError) as e:
        raise RegisterError(f"--student: {e}") from None
    variants = sorted(config["variants"])
    if variant is None:
        emas = [v for v in variants if v.startswith("ema_")]
        variant = emas[0] if emas else "online"
    if variant not in config["variants"]:
        raise RegisterError(f"--student: variant {variant!r} not in {folder} (has {variants})")
    entry = config["variants"][variant]
    weights = folder / entry["file"]
    if not weights.is_file():
        raise RegisterError(f"--student: {weights} is missing (re-run the distill stage)")
    h = hashlib.sha256(f"{variant}:{entry['sha256']}".encode()).hexdigest()
    run_json = folder / "run.json"
    run_info = read_json(run_json) if run_json.is_file() else {}
    return {
        "config": config,
        "variant": variant,
        "sha256": h,
        "weights_sha256": entry["sha256"],
        "run": run_info if isinstance(run_info, dict) else {},
    }


def student_for(params: Params, student_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """`student_info` of the evaluated weights: `evaluate.ema` (e.g. ema_0.999) if the student has it, else the
    default choice."""
    from ctm_core.io.student_format import ema_variant

    first = student_info(student_dir, None)
    name = ema_variant(params.evaluate.ema)
    variant = name if name in first["config"].get("variants", {}) else first["variant"]
    return student_info(student_dir, variant) if variant != first["variant"] else first


def provenance(meta: dict[str, Any], repo_root: Path) -> dict[str, str]:
    """{'data.hash', 'teacher.hash'}: from the student's meta (distill stage), else dvc.lock, else 'unknown'."""
    from pipelines.support.tracking import data_hash_from_lock

    def pick(key: str, out_path: str) -> str:
        found = next((str(meta[k]) for k in _META_KEYS[key] if meta.get(k)), None)
        return found or data_hash_from_lock(repo_root, out_path) or "unknown"

    return {"data.hash": pick("data.hash", "data/prepared"), "teacher.hash": pick("teacher.hash", "artifacts/teacher")}


# --- runs and versions ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def target_run(params: Params, root: Path, tracking_uri: str, distill_run_id: str | None, tags: dict[str, str]):
    """The distill stage's run when it exists in this store, else this stage's own (resumable) run."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.support.tracking import run_name, start_run

    mlflow.set_tracking_uri(tracking_uri)
    if distill_run_id:
        try:
            MlflowClient(tracking_uri).get_run(distill_run_id)
        except MlflowException:
            logger.warning(
                "run.json names MLflow run %s, which is not in %s; logging into a run of the register stage instead",
                distill_run_id,
                redact_uri(tracking_uri),
            )
        else:
            with mlflow.start_run(run_id=distill_run_id) as run:
                yield run
            return
    with start_run(
        run_name("register", tags["ctm.params_hash"]),
        tracking_uri=tracking_uri,
        experiment_name=params.mlflow.experiment_name,
        tags=tags,
        repo_root=root,
    ) as run:
        yield run


_ENTRY_TEMPLATE = '''"""MLflow models-from-code entry of the CTM sampler (written by pipelines.support.registry).

Runs on mlflow.pyfunc.load_model. Before anything is imported from code/, every file under code/ is checked against
CODE_SHA256: a file changed, added (e.g. a __pycache__ .pyc) or removed is refused in one line and nothing from
code/ runs. An edit of this file or of MLmodel cannot be caught from here (the check would be edited with it): load
through pipelines.support.registry.verify_registered_model, which checks every file against the registry first.
"""

import hashlib
import os
import sys

import mlflow.models

CODE_SHA256 = {code_sha256}


def _check_code(root):
    found = {{}}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root).replace(os.sep, "/")
            if os.path.islink(path) or not (os.path.isdir(path) or os.path.isfile(path)):
                found[rel] = "not a plain file"
            elif os.path.isfile(path):
                h = hashlib.sha256()
                with open(path, "rb") as f:
                    for chunk in iter(lambda: f.read(1 << 20), b""):
                        h.update(chunk)
                found[rel] = h.hexdigest()
    bad = sorted(k for k in set(found) | set(CODE_SHA256) if found.get(k) != CODE_SHA256.get(k))
    if bad:
        raise RuntimeError(
            f"{{root}}: code files differ from the sha256 recorded when the model was logged ({{', '.join(bad[:5])}}) "
            "(fix: the model was modified; fetch or register it again)"
        )


_CODE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "code")
_check_code(_CODE)
if _CODE not in sys.path:  # MLflow puts code/ on sys.path when it loads the model, not when it logs it
    sys.path.append(_CODE)
_write_bytecode = sys.dont_write_bytecode
sys.dont_write_bytecode = True  # no __pycache__ written into code/: the folder stays as checked
try:
    import ctm_core.diffusion.samplers  # noqa: F401 (everything the sampler imports later, imported while checked)
    import ctm_core.io.student_format  # noqa: F401
    from ctm_pyfunc.pyfunc_model import CTMSampler
finally:
    sys.dont_write_bytecode = _write_bytecode

mlflow.models.set_model(CTMSampler())
'''


def _stage_code(tmp: Path) -> tuple[Path, list[str]]:
    """The models-from-code entry file and its code_paths, under `tmp`: a copy of ctm_core and a package
    `ctm_pyfunc` holding only the sampler module (in `tmp/code/`, as MLflow lays them out next to the entry), and the
    entry file with the sha256 of every one of those files. Returns (entry file, code_paths).

    The sampler's package is not called `pipelines`: loading the model puts code/ first on sys.path, and a package of
    the repository's name there would hide the repository's own `pipelines` from a session that loads the model
    (`import pipelines.support.plots` after `mlflow.pyfunc.load_model` failed from the repository root)."""
    import ctm_core
    import pipelines.support.pyfunc_model as pm

    code = tmp / "code"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(Path(ctm_core.__file__).parent, code / "ctm_core", ignore=ignore)
    pkg = code / "ctm_pyfunc"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text('"""The CTM pipeline\'s pyfunc sampler (pipelines/support/pyfunc_model.py)."""\n')
    shutil.copy2(pm.__file__, pkg / "pyfunc_model.py")
    digests = pm.folder_digests(code)
    entry = tmp / ENTRY_FILE
    entry.write_text(_ENTRY_TEMPLATE.format(code_sha256=json.dumps(digests, indent=4)))
    return entry, [str(code / "ctm_core"), str(pkg)]


def _pip_requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for dist in ("mlflow", "torch", "numpy", "pandas", "safetensors"):
        try:
            v = version(dist).split("+")[0]  # torch 2.13.0+cpu -> 2.13.0 (CPU or CUDA wheel of the same release)
        except PackageNotFoundError:
            continue
        reqs.append(f"{dist}=={v}")
    return reqs


def image_shape(info: dict[str, Any]) -> str:
    """`HxWxC` of the student (`student_info` `info`): the value of `SHAPE_TAG`."""
    kw = info["config"]["init_kwargs"]
    return f"{kw['img_resolution']}x{kw['img_resolution']}x{kw['img_channels']}"


def check_image_shape(client, model_name: str, shape: str) -> None:
    """Raise RegisterError (one line) if `model_name` already holds versions of another image shape (`SHAPE_TAG`):
    a model trained on other data must get its own name, not stack on the digits model."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{model_name}'")
    except MlflowException:
        return
    other = sorted(
        ((v.tags or {}).get(SHAPE_TAG), int(v.version))
        for v in versions
        if (v.tags or {}).get(SHAPE_TAG) not in (None, shape)
    )
    if other:
        found, version = other[-1]
        raise RegisterError(
            f"register.model_name: {model_name!r} holds {found} models (version {version}), got a {shape} student "
            "(fix: set register.model_name and mlflow.experiment_name to a name for this data, e.g. ctm-cifar10)"
        )


def _find_version(client, name: str, student_sha256: str):
    """The newest existing version of `name` whose STUDENT_TAG equals `student_sha256`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}'")
    except MlflowException:
        return None
    # A version without a manifest tag (logged before models-from-code) is not reused: it is logged again.
    hits = [v for v in versions if (v.tags or {}).get(STUDENT_TAG) == student_sha256 and MANIFEST_TAG in (v.tags or {})]
    return max(hits, key=lambda v: int(v.version)) if hits else None


def log_model_version(
    client, model_name: str, student_dir: str | os.PathLike[str], info: dict[str, Any], rho: float, tags: dict
) -> tuple[str, bool]:
    """The registry version of the student (`student_info` `info`) in the active run: an existing version with the
    same weights is reused, else the pyfunc model is logged from code, registered, and its manifest recorded
    (`MANIFEST_FILE` + tag `MANIFEST_TAG`). Applies `tags` to the version (a re-evaluation's metrics land on a reused
    version). Returns (version, reused)."""
    import mlflow

    from pipelines.support.pyfunc_model import folder_digests, input_example, make_signature

    mv = _find_version(client, model_name, info["sha256"])
    reused = mv is not None
    if not reused:
        kw = info["config"]["init_kwargs"]
        student = Path(student_dir).resolve()
        model_config = {"variant": info["variant"], "rho": float(rho), "student_files": folder_digests(student)}
        with tempfile.TemporaryDirectory(prefix="ctm-register-") as tmp:
            entry, code_paths = _stage_code(Path(tmp))
            model_info = mlflow.pyfunc.log_model(
                name=MODEL_ARTIFACT_NAME,
                python_model=str(entry),
                model_config=model_config,
                artifacts={"student": str(student)},
                signature=make_signature(kw["img_resolution"], kw["img_channels"]),
                input_example=input_example(),
                code_paths=code_paths,
                pip_requirements=_pip_requirements(),
            )
        mv = mlflow.register_model(model_info.model_uri, model_name, tags=tags)
        manifest_sha = _record_manifest(client, model_info.model_id, model_name, str(mv.version))
        client.set_model_version_tag(model_name, str(mv.version), MANIFEST_TAG, manifest_sha)
    version = str(mv.version)
    for k, v in tags.items():
        client.set_model_version_tag(model_name, version, k, v)
    return version, reused


def _record_manifest(client, model_id: str, model_name: str, version: str) -> str:
    """Download the registered version as any consumer would, write `MANIFEST_FILE` ({path: sha256} of every file)
    into the logged model's artifacts, and return the manifest's sha256 (the version's `MANIFEST_TAG`)."""
    import mlflow

    from pipelines.support.pyfunc_model import folder_digests

    with tempfile.TemporaryDirectory(prefix="ctm-manifest-") as tmp:
        local = mlflow.artifacts.download_artifacts(
            client.get_model_version_download_uri(model_name, version),
            dst_path=str(Path(tmp) / "m"),
            tracking_uri=client.tracking_uri,
        )
        manifest = folder_digests(local)
        data = _manifest_bytes(manifest)
        path = Path(tmp) / MANIFEST_FILE
        path.write_bytes(data)
        client.log_model_artifact(model_id, str(path))
    return hashlib.sha256(data).hexdigest()


def _manifest_bytes(manifest: dict[str, str]) -> bytes:
    return (json.dumps({"files": manifest, "format": "ctm-model-manifest/1"}, indent=1, sort_keys=True) + "\n").encode()


_MODELS_URI = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[0-9]+))$")


def verify_registered_model(
    name_or_uri: str,
    dst_path: str | os.PathLike[str] | None = None,
    *,
    tracking_uri: str | None = None,
    alias: str = "champion",
) -> str:
    """Download a registered version and check every file against the version's manifest tag; returns the local
    folder to load (`mlflow.pyfunc.load_model(verify_registered_model("models:/ctm-digits@champion"))`).

    `name_or_uri`: `models:/<name>@<alias>`, `models:/<name>/<version>`, or a bare name (its `@alias`). The alias is
    resolved to a version number once, so the files checked are the files of that version. `dst_path`: an empty or
    missing folder (default: a new temporary folder, left for the caller). Nothing of the model is imported here;
    any difference (a changed, added or removed file, a manifest that does not match the tag, no tag) raises
    RegisterError in one line.
    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipelines.support.pyfunc_model import check_digests

    m = _MODELS_URI.match(name_or_uri) if name_or_uri.startswith("models:/") else None
    if name_or_uri.startswith("models:/") and m is None:
        raise RegisterError(
            f"model: expected models:/<name>@<alias>, models:/<name>/<version> or a name, "
            f"got {redact_text(name_or_uri[:200])!r}"
        )
    name = m["name"] if m else name_or_uri
    client = MlflowClient(tracking_uri=tracking_uri)
    try:
        if m is not None and m["version"]:
            mv = client.get_model_version(name, m["version"])
        else:
            mv = client.get_model_version_by_alias(name, (m["alias"] if m else None) or alias)
    except MlflowException as e:
        first = (str(e).splitlines() or [type(e).__name__])[0][:200]
        raise RegisterError(
            f"{redact_text(name_or_uri[:200])}: no such registered version ({redact_text(first)})"
        ) from None
    uri = f"models:/{name}/{mv.version}"  # (named in messages; the files come from the version's own location)
    tag = (mv.tags or {}).get(MANIFEST_TAG)
    if not tag:
        raise RegisterError(
            f"{uri}: no {MANIFEST_TAG} tag; expected a version registered by pipelines.register with a manifest "
            "(fix: run the register stage again to log a verifiable version)"
        )
    dst = Path(dst_path) if dst_path is not None else Path(tempfile.mkdtemp(prefix="ctm-model-"))
    if dst.exists() and any(dst.iterdir()):
        raise RegisterError(
            f"dst_path: expected an empty or missing folder, got {dst} with files in it (fix: pass a new one)"
        )
    source = client.get_model_version_download_uri(name, str(mv.version))
    local = Path(download_artifacts(source, dst_path=str(dst), tracking_uri=tracking_uri))
    manifest_path = local / MANIFEST_FILE
    data = manifest_path.read_bytes() if manifest_path.is_file() and not manifest_path.is_symlink() else b""
    if hashlib.sha256(data).hexdigest() != tag:
        raise RegisterError(
            f"{uri}: {MANIFEST_FILE} does not match the version's {MANIFEST_TAG} tag "
            "(fix: the model's files were modified in the artifact store; register the student again)"
        )
    try:
        skip = frozenset({MANIFEST_FILE, MLFLOW_DOWNLOAD_META})
        check_digests(local, json.loads(data)["files"], "model files", skip=skip)
    except ValueError as e:
        raise RegisterError(f"{uri}: {e}") from None
    return str(local)


# --- champion and aliases ---------------------------------------------------------------------------------------------
def champion_version(client, name: str, alias: str):
    """The version holding `alias`, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def float_tag(mv, key: str) -> float | None:
    """A version tag as a finite float, or None."""
    if mv is None:
        return None
    try:
        v = float((mv.tags or {})[key])
    except (KeyError, TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def champion_evidence(client, reg):
    """(the `@champion` version of `reg.model_name` or None, its gate Evidence from its `metric.*` and protocol
    tags or None)."""
    champ = champion_version(client, reg.model_name, reg.champion_alias)
    if champ is None:
        return None, None
    noise = metric_noise(metric_tags(champ), reg.metric)
    return champ, Evidence(float_tag(champ, f"metric.{reg.metric}"), noise, (champ.tags or {}).get(PROTOCOL_TAG))


def headline_metric_tags(metrics: dict[str, Any], metric: str) -> dict[str, str]:
    """The `metric.*` tags a version carries: the gate's metric and the error bars `metric_noise` reads from it
    (`_std`, `_ci_low`, `_ci_high`), not every number of the evaluation (those stay in the run and metrics.json)."""
    keys = (metric, f"{metric}_std", f"{metric}_ci_low", f"{metric}_ci_high")
    return {f"metric.{k}": repr(metrics[k]) for k in keys if k in metrics}


def version_tags_for(
    info: dict[str, Any],
    prov: dict[str, str],
    run_tags: dict[str, str],
    p_hash: str,
    status: str,
    protocol_sha: str | None,
    metrics: dict[str, Any],
    metric: str,
) -> dict[str, str]:
    """The tags of a registered version: image shape, student and weights sha256, provenance (data/teacher hashes),
    git commit, params hash, evaluation status and protocol, the headline metric with its error bars
    (`headline_metric_tags`), and the distill params hash when the student records one."""
    meta = info["config"].get("meta", {}) or {}
    tags = {
        SHAPE_TAG: image_shape(info),
        STUDENT_TAG: info["sha256"],
        "student.variant": info["variant"],
        "student.weights_sha256": info["weights_sha256"],
        **prov,
        "git.commit": run_tags["git.commit"],
        "git.dirty": run_tags["git.dirty"],
        "params.hash": p_hash,
        EVAL_STATUS_TAG: "ok" if status == "ok" else "failed",
        PROTOCOL_TAG: protocol_sha or "unknown",
        **headline_metric_tags(metrics, metric),
    }
    if meta.get("params_hash"):
        tags["distill.params_hash"] = str(meta["params_hash"])
    return tags


def metric_tags(mv) -> dict[str, float]:
    """The `metric.*` version tags as numbers (what `metric_noise` reads for the champion)."""
    out = {}
    for k in mv.tags or {}:
        if k.startswith("metric."):
            v = float_tag(mv, k)
            if v is not None:
                out[k.removeprefix("metric.")] = v
    return out


def apply_decision(client, reg, version: str, gate: Decision, champ) -> list[str]:
    """Move the aliases of `reg.model_name` for `gate` (champion: `@champion` to `version`, dropping its
    `@challenger`; challenger: `@challenger` + tag); tag the decision. Returns the version's aliases, sorted."""
    if gate.decision == "champion" and not (champ is not None and str(champ.version) == version):
        client.set_registered_model_alias(reg.model_name, reg.champion_alias, version)
        challenger = champion_version(client, reg.model_name, reg.challenger_alias)
        if challenger is not None and str(challenger.version) == version:
            client.delete_registered_model_alias(reg.model_name, reg.challenger_alias)
    elif gate.decision == "challenger":
        client.set_registered_model_alias(reg.model_name, reg.challenger_alias, version)
        client.set_model_version_tag(reg.model_name, version, "challenger", "true")
    client.set_model_version_tag(reg.model_name, version, DECISION_TAG, gate.decision)
    return sorted(client.get_model_version(reg.model_name, version).aliases or [])


def log_decision(record: dict[str, Any], gate: Decision, champion_value: float | None) -> None:
    """Tags, numbers (`register/*` metrics) and the record (`register/decision-v<version>.json`) of the decision,
    to the active run. The numbers of the run's n-th decision are logged at step n: a run that registers again (a
    re-evaluated student, a repeated stage) gets a history, never two values of a metric at one step."""
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tags(
        {
            "ctm.register.decision": gate.decision,
            "ctm.register.version": record["version"],
            "ctm.register.model_name": record["model_name"],
        }
    )
    numbers = {"value": record["value"], "champion_value": champion_value, **gate.to_dict()}
    keys = ("value", "champion_value", "relative_improvement", "improvement", "noise", "threshold")
    numbers = {f"register/{k}": numbers[k] for k in keys if numbers[k] is not None}
    if numbers:
        run_id = mlflow.active_run().info.run_id
        client = MlflowClient()
        step = max(len(client.get_metric_history(run_id, f"register/{k}")) for k in keys)
        mlflow.log_metrics(numbers, step=step)
    mlflow.log_dict(record, f"register/decision-v{record['version']}.json")
