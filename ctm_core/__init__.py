"""ctm_core: Consistency Trajectory Models (Kim et al., ICLR 2024) on EDM teachers, as a plain PyTorch library.

Importing this package touches no disk, network or tracking server, and imports no Ray/MLflow/DVC.
The public API below is a contract: tests and pipelines outside the package call these names.
"""

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
from ctm_core.nets.precond import EDMPrecond, VEPrecond, VPPrecond, build_precond
from ctm_core.nets.presets import PRESETS, build_preset
from ctm_core.nets.student import CTMStudent

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
    "log_likelihood",
    "read_edm_snapshot",
    "read_teacher",
    "save_teacher",
    "student_as_denoiser",
    "student_heun_sampler",
]
