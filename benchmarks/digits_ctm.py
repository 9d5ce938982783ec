"""CTM distillation on sklearn's 8x8 digits, on CPU: EDM teacher -> CTM student, compared by Fréchet distance.

Steps: (1) scale ``sklearn.datasets.load_digits`` (values 0..16) to [-1, 1] as (B, 1, 8, 8); (2) train a toy MLP EDM
denoiser (``ctm_core.nets.toy.ToyEDMDenoiser``) with ``EDMTrainer``; (3) distill a ``ToyCTMStudent`` (initialized from
the teacher's EMA, s-branch fresh) with ``CTMTrainer`` (CTM l2 + DSM); (4) train a small sklearn MLP classifier on the
data and compute the Fréchet distance between the hidden-layer features of generated samples and of the data, for:
student 1-step and 2-step (γ = 0), teacher 1-step Euler (= D(x_T; σ_max)) and teacher 35-NFE Heun (EDM sampler,
18 steps). The "data vs data" row (two disjoint halves of the dataset) is the noise floor.

Result with the defaults (2026-11-26, one shared CPU core, 216 s in all; teacher 3000 Adam steps, student 1000 RAdam
steps, CTM l2 + DSM, target μ 0.99; FD in the 64-d hidden layer of an MLP classifier with 98.1% held-out accuracy):
    data half vs other half (floor) 2.67 | CTM student NFE 1: 1.79, NFE 2: 1.33 | student EMA 0.999 NFE 1: 13.9
    (1000 steps are too few for a 0.999 EMA) | teacher Euler NFE 1: 50.1 | teacher Heun NFE 35: 0.93
The floor uses two halves of 898 samples (more small-sample bias than 1797 vs 1797), so values below it are possible.

Examples:
    python benchmarks/digits_ctm.py                         # defaults, about 7 min on one shared core
    python benchmarks/digits_ctm.py --teacher-steps 500 --student-steps 300 --num-samples 500   # smoke run
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # run from a checkout without installing


def frechet_distance(f1: np.ndarray, f2: np.ndarray) -> float:
    """Fréchet distance between the Gaussians fitted to two feature sets (ctm_core.eval.metrics; Heusel et al. 2017).

    Dead ReLU units make the covariances singular: the symmetric-eigendecomposition form is used."""
    from ctm_core.eval.metrics import feature_statistics
    from ctm_core.eval.metrics import frechet_distance as fd

    return fd(*feature_statistics(f1), *feature_statistics(f2), method="eigh")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher-steps", type=int, default=3000)
    ap.add_argument("--teacher-batch", type=int, default=128)
    ap.add_argument("--teacher-lr", type=float, default=1e-3)
    ap.add_argument("--student-steps", type=int, default=1000)
    ap.add_argument("--student-batch", type=int, default=64)
    ap.add_argument("--student-lr", type=float, default=4e-4)
    ap.add_argument("--target-rate", type=float, default=0.99, help="target EMA μ (official 0.999, for long runs)")
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--distance", default="l2", choices=["l2", "pseudo_huber"])
    ap.add_argument("--num-samples", type=int, default=1797)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args(argv)

    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    from ctm_core.config import DistillParams, TeacherTrainParams
    from ctm_core.diffusion.samplers import edm_sampler, gamma_sampler
    from ctm_core.nets.toy import ToyCTMStudent, ToyEDMDenoiser
    from ctm_core.training.edm_training import EDMTrainer
    from ctm_core.training.trainer import CTMTrainer, TensorDataSource

    torch.set_num_threads(args.threads)
    t_start = time.time()
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 8.0 - 1.0  # 0..16 -> [-1, 1]
    x = x.reshape(-1, 1, 8, 8)
    y = digits.target
    print(f"digits: {tuple(x.shape)}, range [{x.min():.1f}, {x.max():.1f}]")

    # -- feature network for the Fréchet distance ---------------------------------------------------------------
    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=400, random_state=args.seed)
    perm = np.random.default_rng(args.seed).permutation(len(y))
    tr_idx, te_idx = perm[: len(y) * 4 // 5], perm[len(y) * 4 // 5 :]
    X = x.reshape(len(y), -1).numpy()
    clf.fit(X[tr_idx], y[tr_idx])
    print(f"feature classifier: held-out accuracy {clf.score(X[te_idx], y[te_idx]):.3f}")
    clf.fit(X, y)

    def features(samples: torch.Tensor) -> np.ndarray:
        h = samples.reshape(samples.shape[0], -1).double().clamp(-1, 1).numpy() @ clf.coefs_[0] + clf.intercepts_[0]
        return np.maximum(h, 0.0)

    feats_data = features(x)

    # -- teacher --------------------------------------------------------------------------------------------------
    torch.manual_seed(args.seed)
    teacher = ToyEDMDenoiser((1, 8, 8), hidden=args.hidden, depth=args.depth)
    edm_cfg = TeacherTrainParams(
        lr=args.teacher_lr,
        lr_warmup_steps=0,
        batch=args.teacher_batch,
        seed=args.seed,
        steps=args.teacher_steps,
    )
    data = TensorDataSource(x, batch_size=args.teacher_batch, seed=args.seed)
    edm = EDMTrainer(edm_cfg, teacher, data, progress=args.progress)
    t0 = time.time()
    edm.train(args.teacher_steps)
    teacher_ema = edm.ema_model().eval()
    print(f"teacher: {args.teacher_steps} steps in {time.time() - t0:.0f}s")

    # -- student --------------------------------------------------------------------------------------------------
    torch.manual_seed(args.seed + 1)
    student = ToyCTMStudent.from_teacher(teacher_ema)
    student.requires_grad_(True)
    ctm_cfg = DistillParams(
        N=18,  # the official CIFAR-10 grid
        K=17,
        distance=args.distance,
        lr=args.student_lr,
        target_ema=args.target_rate,
        eval_emas=[0.999],
        batch=args.student_batch,
        microbatch=args.student_batch,
        seed=args.seed,
        steps=args.student_steps,
        checkpoint_every=args.student_steps,
    )
    data = TensorDataSource(x, batch_size=args.student_batch, seed=args.seed)
    ctm = CTMTrainer(ctm_cfg, student, teacher_ema, data, progress=args.progress)
    t0 = time.time()
    ctm.train(args.student_steps)
    print(f"student: {args.student_steps} steps in {time.time() - t0:.0f}s")

    # -- samples and Fréchet distances -----------------------------------------------------------------------------
    n = args.num_samples
    latents = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(args.seed + 100))
    rows = []
    with torch.no_grad():
        for name, net in (("student (raw)", ctm.model.eval()), ("student EMA 0.999", ctm.emas[0.999].eval())):
            for nfe in (1, 2):
                rows.append((f"CTM {name}, NFE {nfe} (gamma=0)", gamma_sampler(net, latents, nfe=nfe)))
        x_T = latents.double() * teacher_ema.sigma_max
        rows.append(("teacher Euler, NFE 1", teacher_ema(x_T, torch.tensor(teacher_ema.sigma_max)).double()))
        rows.append(("teacher Heun, NFE 35", edm_sampler(teacher_ema, latents, num_steps=18)))
    half = len(x) // 2
    print(f"\nFréchet distance in the classifier's 64-d hidden features ({n} samples vs {len(x)} data):")
    print(f"  {'data half vs other half (floor)':38s} {frechet_distance(features(x[:half]), features(x[half:])):8.3f}")
    for name, samples in rows:
        print(f"  {name:38s} {frechet_distance(features(samples.float()), feats_data):8.3f}")
    print(f"total time {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    main()
