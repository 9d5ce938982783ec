"""ctm_core: Consistency Trajectory Models (Kim et al., ICLR 2024) on EDM teachers, as a plain PyTorch library.

Importing this package touches no disk, network or tracking server, and imports no Ray/MLflow/DVC. The public API
below is a contract (docs/api.md): code outside the package calls these names as `ctm_core.<name>`. They are
resolved lazily from the sub-packages, so `import ctm_core.data.prepared` does not load the networks (a DVC stage's
code dependencies are exactly the modules it imports: docs/pipeline.md#code-deps).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it (a literal: tools/dvc_deps.py reads it to follow `from ctm_core import`)
_EXPORTS = {
    "CTMStudent": "ctm_core.nets.student",
    "EDMPrecond": "ctm_core.nets.precond",
    "EDMSnapshot": "ctm_core.io.edm_pickle",
    "PRESETS": "ctm_core.nets.presets",
    "StackedRandomGenerator": "ctm_core.diffusion.samplers",
    "UnsafeCheckpointError": "ctm_core.io.edm_pickle",
    "VEPrecond": "ctm_core.nets.precond",
    "VPPrecond": "ctm_core.nets.precond",
    "bits_per_dim": "ctm_core.diffusion.likelihood",
    "build_precond": "ctm_core.nets.precond",
    "build_preset": "ctm_core.nets.presets",
    "convert_edm_pickle": "ctm_core.io.teacher_format",
    "edm_sampler": "ctm_core.diffusion.samplers",
    "gamma_sampler": "ctm_core.diffusion.samplers",
    "karras_sigmas": "ctm_core.diffusion.schedules",
    "load_edm_checkpoint": "ctm_core.io.teacher_format",
    "load_official_ctm": "ctm_core.nets.official.loader",
    "log_likelihood": "ctm_core.diffusion.likelihood",
    "read_edm_snapshot": "ctm_core.io.edm_pickle",
    "read_teacher": "ctm_core.io.teacher_format",
    "save_teacher": "ctm_core.io.teacher_format",
    "student_as_denoiser": "ctm_core.diffusion.samplers",
    "student_heun_sampler": "ctm_core.diffusion.samplers",
}

__all__ = [
    "CTMStudent",
    "EDMPrecond",
    "EDMSnapshot",
    "PRESETS",
    "StackedRandomGenerator",
    "UnsafeCheckpointError",
    "VEPrecond",
    "VPPrecond",
    "bits_per_dim",
    "build_precond",
    "build_preset",
    "convert_edm_pickle",
    "edm_sampler",
    "gamma_sampler",
    "karras_sigmas",
    "load_edm_checkpoint",
    "load_official_ctm",
    "log_likelihood",
    "read_edm_snapshot",
    "read_teacher",
    "save_teacher",
    "student_as_denoiser",
    "student_heun_sampler",
]  # the same names as _EXPORTS (tests/unit/test_public_api.py)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ctm_core' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers see the names; at run time they load on first use
    from ctm_core.diffusion.likelihood import bits_per_dim, log_likelihood
    from ctm_core.diffusion.samplers import (
        StackedRandomGenerator,
        edm_sampler,
        gamma_sampler,
        student_as_denoiser,
        student_heun_sampler,
    )
    from ctm_core.diffusion.schedules import karras_sigmas
    from ctm_core.io.edm_pickle import EDMSnapshot, UnsafeCheckpointError, read_edm_snapshot
    from ctm_core.io.teacher_format import convert_edm_pickle, load_edm_checkpoint, read_teacher, save_teacher
    from ctm_core.nets.official.loader import load_official_ctm
    from ctm_core.nets.precond import EDMPrecond, VEPrecond, VPPrecond, build_precond
    from ctm_core.nets.presets import PRESETS, build_preset
    from ctm_core.nets.student import CTMStudent
