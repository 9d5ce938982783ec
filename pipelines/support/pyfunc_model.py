"""The CTM student as an MLflow pyfunc model: a sampler with 1-step / few-step γ-sampling.

Input (a pandas DataFrame, one request per row, or a dict of scalars = one request):

    num_samples  int    images to draw (>= 1)
    nfe          int    student network evaluations (>= 1; 1 = one jump from sigma_max to sigma_min)
    gamma        float  in [0, 1]: 0 = deterministic long jumps, 1 = CM multistep (Kim et al. 2024, Algorithm 2)
    seed         int    image i of the request uses seed + i (per-sample generators, EDM generate.py style), so an
                        image does not depend on num_samples or on the batch it was computed in
    class_labels list[int] (optional) one class index per image, or a single one for all; conditional students
                        draw a random class per image from its own generator when absent; unconditional students
                        reject it

Bounds: Σ num_samples × nfe over the rows of one request ≤ `MAX_EVALS_PER_REQUEST` (1024 image-network
evaluations: the default digits student draws them in ~13 s on 2 CPU cores shared with other jobs, 77 image
evaluations/s measured, inside `mlflow models serve`'s 60 s request timeout); ask for more with several requests
(image i of a request is seed + i, so `num_samples` 512 at seeds 0 and 512 give the same images as one request of
1024 would).
Bad requests raise `RequestError` (an MlflowException with INVALID_PARAMETER_VALUE, HTTP 400, and a ValueError) whose
message is one line naming the field, what was expected and what came (`gamma: expected a number in [0, 1], got 2`);
the served model answers with exactly that line as the JSON `message`.

Output: uint8 numpy array (N, H, W, C), N = sum of num_samples over the rows, in request order. Pixel values are
EDM's 8-bit mapping of the sampler output x ∈ [-1, 1]: clip(x·127.5 + 128, 0, 255) (NVlabs/edm generate.py's
final conversion). For data with fewer levels (sklearn digits: 17 grey levels 0..16 mapped to [-1, 1] by
prepare's `levels_to_unit`), level L appears as about L/16·255: the pixel scale is always 0..255.

Artifacts: `context.artifacts["student"]` is a student folder written by `ctm_core.io.student_format.save_student`.
The model is logged from code (MLflow models-from-code: an entry file calling `mlflow.models.set_model`, written by
`pipelines.support.registry`; no cloudpickle). Its `model_config` fixes the weights variant (e.g. `ema_0.999`), ρ and
the sha256 of every file of the student folder: `load_context` checks the folder against them (same files, same
bytes) before any weights are read, so an edited `config.json` (another weights path, a digest to match swapped
weights) is refused. That check runs inside the code it protects: an edit of the code itself is caught only from
outside, by `pipelines.support.registry.verify_registered_model` (every artifact file against the version's tag).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import numpy as np
import pandas as pd  # the predict type hint (a DataFrame hint: MLflow infers nothing from it and does not warn)
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

__all__ = [
    "CTMSampler",
    "INPUT_COLUMNS",
    "MAX_EVALS_PER_REQUEST",
    "MAX_NFE",
    "RequestError",
    "check_digests",
    "folder_digests",
    "input_example",
    "make_signature",
    "to_uint8",
]

INPUT_COLUMNS = ("num_samples", "nfe", "gamma", "seed", "class_labels")
MAX_EVALS_PER_REQUEST = 1024  # Σ num_samples × nfe per request: answers well within the server's 60 s timeout
MAX_NFE = MAX_EVALS_PER_REQUEST
_CHUNK = 256  # images per forward pass (results do not depend on it: per-image generators)


class RequestError(MlflowException, ValueError):
    """A bad request, in one line (`<field>: expected ..., got ...`): HTTP 400 INVALID_PARAMETER_VALUE when served.

    MLflow's scoring server (mlflow/pyfunc/scoring_server `invocations`) rewrites the `message` of an MlflowException
    raised in predict to "Failed to predict data '<the whole request>'. Error: <message>" (and answers any other
    exception with a generic message and the real one buried in a stack trace). This class keeps its own line:
    `message` is set once, by the constructor, and later assignments are ignored, so the response's JSON
    `message` is exactly the line.
    """

    def __init__(self, message: str):
        self._line = None
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._line

    @message.setter
    def message(self, value: str) -> None:
        if self._line is None:
            self._line = str(value)


def folder_digests(root: str | os.PathLike[str], skip: frozenset[str] = frozenset()) -> dict[str, str]:
    """{relative POSIX path: sha256} of every file under `root` (names in `skip` left out). A symlink or any other
    non-regular entry raises InputError: a manifest describes plain files only."""
    from ctm_core.errors import InputError
    from ctm_core.io.hashing import sha256_file

    root = Path(root)
    out: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in sorted(dirnames) + sorted(filenames):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            if path.is_symlink() or not (path.is_dir() or path.is_file()):
                raise InputError(
                    f"{path}: expected a plain file or folder, got a link or special file (fix: fetch again)"
                )
            if path.is_file() and rel not in skip:
                out[rel] = sha256_file(path)
    return dict(sorted(out.items()))


def check_digests(root: str | os.PathLike[str], expected: Mapping[str, str], what: str, skip=frozenset()) -> None:
    """Raise InputError (one line) unless the files under `root` are exactly `expected` ({rel: sha256})."""
    from ctm_core.errors import InputError

    found = folder_digests(root, skip)
    extra = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    changed = sorted(k for k in set(found) & set(expected) if found[k] != expected[k])
    if extra or missing or changed:
        parts = [
            f"{k}: {', '.join(v[:5])}" for k, v in (("changed", changed), ("added", extra), ("missing", missing)) if v
        ]
        raise InputError(
            f"{root}: {what}: files differ from the recorded sha256 ({'; '.join(parts)}) "
            "(fix: the model was modified after it was logged; fetch or register it again)"
        )


def to_uint8(x) -> np.ndarray:
    """(B, C, H, W) tensor in [-1, 1] -> (B, H, W, C) uint8 via clip(x·127.5 + 128, 0, 255) (EDM generate.py)."""
    import torch

    img = (x.to(torch.float64) * 127.5 + 128).clip(0, 255).to(torch.uint8)  # (B, C, H, W)
    return img.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)


def input_example():
    """One request: 1 image, 1 step, deterministic (shown in the MLflow UI and used for the serving example)."""
    return pd.DataFrame({"num_samples": [1], "nfe": [1], "gamma": [0.0], "seed": [0]})


def make_signature(img_resolution: int, img_channels: int):
    """ModelSignature: the request columns above -> uint8 tensor (-1, H, W, C)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema, TensorSpec
    from mlflow.types.schema import Array

    inputs = Schema(
        [
            ColSpec(DataType.long, "num_samples"),
            ColSpec(DataType.long, "nfe"),
            ColSpec(DataType.double, "gamma"),
            ColSpec(DataType.long, "seed"),
            ColSpec(Array(DataType.long), "class_labels", required=False),
        ]
    )
    outputs = Schema(
        [TensorSpec(np.dtype(np.uint8), (-1, int(img_resolution), int(img_resolution), int(img_channels)))]
    )
    return ModelSignature(inputs=inputs, outputs=outputs)


def _is_missing(v: Any) -> bool:
    if v is None:
        return True
    if isinstance(v, float) and math.isnan(v):
        return True
    return False


def _as_int(name: str, v: Any, lo: int, hi: int) -> int:
    if isinstance(v, (bool, np.bool_)) or _is_missing(v):
        raise RequestError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r}")
    if isinstance(v, (float, np.floating)):
        if not float(v).is_integer():
            raise RequestError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r}")
    try:
        i = int(v)
    except (TypeError, ValueError):
        raise RequestError(f"{name}: expected an integer in [{lo}, {hi}], got {v!r}") from None
    if not lo <= i <= hi:
        raise RequestError(f"{name}: expected an integer in [{lo}, {hi}], got {i}")
    return i


def _rows(model_input: Any) -> list[dict[str, Any]]:
    """Requests as plain dicts from a DataFrame (one per row), a dict of scalars, or a list of dicts."""
    if isinstance(model_input, pd.DataFrame):
        return model_input.to_dict(orient="records")
    if isinstance(model_input, Mapping):
        values = dict(model_input)
        if any(isinstance(v, (list, tuple, np.ndarray)) for k, v in values.items() if k != "class_labels"):
            return pd.DataFrame(values).to_dict(orient="records")  # a dict of columns
        return [values]
    if isinstance(model_input, list) and all(isinstance(r, Mapping) for r in model_input):
        return [dict(r) for r in model_input]
    raise RequestError(
        f"model_input: expected a pandas DataFrame or a dict with keys {list(INPUT_COLUMNS)}, got "
        f"{type(model_input).__name__}"
    )


class CTMSampler(mlflow.pyfunc.PythonModel):
    """pyfunc wrapper: γ-sampling (`ctm_core.diffusion.samplers.gamma_sampler`) with the student's G_θ(x_t, t, s)."""

    def __init__(self, variant: str | None = None, rho: float = 7.0):
        self.variant = variant  # None: the first EMA variant of the folder if any, else 'online'
        self.rho = float(rho)
        self.student = None

    def load_context(self, context) -> None:
        """Load the student of `context.artifacts["student"]`. With a `model_config` (a logged model): take variant
        and ρ from it and check every student file against its `student_files` digests first."""
        from ctm_core.io.student_format import load_student, read_student_config

        folder = context.artifacts["student"]
        model_config = getattr(context, "model_config", None) or {}
        expected = model_config.get("student_files")
        if expected is not None:
            check_digests(folder, expected, "student files")
        config = read_student_config(folder)
        variants = sorted(config["variants"])
        variant = model_config.get("variant", self.variant)
        self.rho = float(model_config.get("rho", self.rho))
        if variant is None:
            emas = [v for v in variants if v.startswith("ema_")]
            variant = emas[0] if emas else "online"
        self.loaded_variant = variant
        if variant not in config["variants"]:
            raise ValueError(f"variant: expected one of {variants}, got {variant!r}")
        weights = config["variants"][variant]["file"]
        sha256 = None if expected is None else expected.get(weights)
        self.student = load_student(folder, variant, sha256=sha256)
        self.config = config

    # -- one request --------------------------------------------------------------------------------------------
    def _labels(self, row: dict[str, Any], n: int) -> Any:
        """(n, L) one-hot float32 labels from the request, None when absent (random per image for L > 0 later)."""
        import torch

        L = int(self.student.label_dim)
        raw = row.get("class_labels")
        missing = raw is None or (not isinstance(raw, (list, tuple, np.ndarray)) and _is_missing(raw))
        missing = missing or len(list(raw)) == 0
        if L == 0:
            if not missing:
                raise RequestError(f"class_labels: this student is unconditional (label_dim 0), got {list(raw)!r}")
            return None
        if missing:
            return None
        labels = [_as_int("class_labels[]", v, 0, L - 1) for v in list(raw)]
        if len(labels) == 1:
            labels = labels * n
        if len(labels) != n:
            raise RequestError(f"class_labels: expected 1 or num_samples={n} labels, got {len(labels)}")
        return torch.eye(L, dtype=torch.float32)[torch.tensor(labels, dtype=torch.int64)]  # (n, L)

    def _parse(self, row: dict[str, Any]) -> dict[str, Any]:
        """One request row checked: {'n', 'nfe', 'seed', 'gamma', 'labels' ((n, L) or None)}; RequestError if bad."""
        n = _as_int("num_samples", row.get("num_samples"), 1, MAX_EVALS_PER_REQUEST)
        nfe = _as_int("nfe", row.get("nfe", 1), 1, MAX_NFE)
        seed = _as_int("seed", row.get("seed", 0), 0, 2**63 - 1)
        gamma = row.get("gamma", 0.0)
        if (
            isinstance(gamma, bool)
            or _is_missing(gamma)
            or not isinstance(gamma, (int, float, np.number))
            or not 0.0 <= float(gamma) <= 1.0
        ):
            raise RequestError(f"gamma: expected a number in [0, 1], got {gamma!r}")
        return {"n": n, "nfe": nfe, "seed": seed, "gamma": float(gamma), "labels": self._labels(row, n)}

    def _sample(self, req: dict[str, Any]) -> np.ndarray:
        """(n, H, W, C) uint8 images of one parsed request (`_parse`)."""
        import torch

        from ctm_core.diffusion.samplers import StackedRandomGenerator, gamma_sampler

        n, nfe, seed, gamma, labels_all = req["n"], req["nfe"], req["seed"], req["gamma"], req["labels"]
        st = self.student
        C, R = int(st.img_channels), int(st.img_resolution)
        out = []
        with torch.no_grad():
            L = int(st.label_dim)
            for start in range(0, n, _CHUNK):
                seeds = [seed + i for i in range(start, min(n, start + _CHUNK))]
                rnd = StackedRandomGenerator("cpu", seeds)
                latents = rnd.randn([len(seeds), C, R, R])  # (b, C, R, R) float32, as EDM generate.py draws them
                if labels_all is not None:
                    labels = labels_all[start : start + len(seeds)]  # (b, L)
                elif L > 0:  # a random class per image, drawn after its latents (EDM generate.py order)
                    labels = torch.eye(L, dtype=torch.float32)[rnd.randint(L, size=[len(seeds)])]  # (b, L)
                else:
                    labels = None
                x = gamma_sampler(
                    st,
                    latents,
                    labels,
                    nfe=nfe,
                    gamma=gamma,
                    sigma_min=st.sigma_min,
                    sigma_max=st.sigma_max,
                    rho=self.rho,
                    randn_like=rnd.randn_like,
                )
                out.append(to_uint8(x))
        return np.concatenate(out)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> np.ndarray:
        """Images (N, H, W, C) uint8 for the requests in `model_input` (see the module docstring).

        Every row is checked, and the request's total Σ num_samples × nfe bounded by `MAX_EVALS_PER_REQUEST`, before
        any image is drawn. The DataFrame type hint is MLflow's "no inference" hint: the explicit signature
        (`make_signature`) describes the columns, and dicts / lists of dicts are accepted too (`_rows`).
        """
        if self.student is None:
            raise RuntimeError("CTMSampler: load_context() has not run (load the model with mlflow.pyfunc.load_model)")
        rows = _rows(model_input)
        if not rows:
            raise RequestError("model_input: expected at least one request row, got none")
        requests = [self._parse(r) for r in rows]
        evals = sum(r["n"] * r["nfe"] for r in requests)
        if evals > MAX_EVALS_PER_REQUEST:
            raise RequestError(
                f"num_samples × nfe: expected at most {MAX_EVALS_PER_REQUEST} per request (summed over rows), got "
                f"{evals} (fix: split it into several requests, each starting at seed + the images before it: the "
                "same images as one request)"
            )
        return np.concatenate([self._sample(r) for r in requests])
