"""DVC stage `evaluate`: sample quality vs NFE of the CTM student, teacher baselines, Fréchet distance.

    python -m pipelines.evaluate --params params.yaml --data data/prepared --teacher artifacts/teacher \\
        --student artifacts/student --out artifacts/eval

Protocol (section `evaluate` of params.yaml):

* Feature space (`evaluate.features`):
    - `classifier` (default, the offline digits run; needs labels): a `ctm_core.eval.classifier.SmallClassifier`
      is trained on the prepared TRAIN split (`evaluate.classifier`: seeded, Adam; `steps` is turned into whole
      epochs, ceil(steps / batches per epoch)). Its held-out accuracy is in fd_details.json. The Inception FID is
      meaningless on 8x8 grey digits: these Fréchet distances ("FD") are comparable only between runs with the same
      classifier (its weights' sha256 is in protocol.json). Reference statistics: float64 mean / unbiased
      covariance of the features of the TRAIN split; the data floor `fd_heldout_vs_train` is the held-out split's FD
      against them, at the held-out sample size, which is also the default seed-set size of every model FD (like
      with like, docs/evaluation.md#data-floor).
    - `inception`: FID on the field's protocol (`pipelines.support.fid_reference`: pinned pytorch-fid Inception-v3 pool3
      weights through the fetcher, EDM's uint8 images, reference statistics computed from the prepared data and
      cached, or a fetched npz such as EDM's cifar10-32x32.npz). Works on unlabelled data. The CIFAR-10 protocol
      is `num_samples: 50000` against the 50,000 training images (EDM fid.py:116). Weights and reference are
      resolved and checked before any sampling. FD values here ARE FIDs (the `fd_` key names are kept).
* Methods, each on the same seeds: image i uses seed `seed_start + i` through `StackedRandomGenerator`
  (EDM generate.py:182-196), so an image does not depend on the batch size or its position in the batch:
    - student (`evaluate.ema` weights) with `gamma_sampler` at every NFE of `evaluate.nfe` ∪ {1} for every gamma of
      `evaluate.gammas` ∪ {0, 1} (at NFE 1 every gamma gives the same jump sigma_max -> sigma_min, sampled once);
    - the student's own score sampler (`student_heun_sampler`, Heun with g(x, σ, σ)) at NFE 3 and 7 (kept
      short: every 35-NFE method costs ~20-40 s per 1000 digits on 2 CPU cores);
    - the teacher with EDM's deterministic Heun sampler at `teacher_nfe` (= 2·steps − 1) and with Euler at
      `teacher_euler_nfe` (1 = the baseline D(x_T; sigma_max), one Euler step from sigma_max to 0).
  Classifier: every sample is clamped to [-1, 1] and quantised to the dataset's levels (`images_to_levels`, the
  inverse of prepare's `level / (L − 1) · 2 − 1`), exactly as the real images were, before the classifier sees it.
  Inception: every sample becomes EDM's saved uint8 image `clip(x·127.5 + 128, 0, 255)` (generate.py:297).
* FD of each method on K = num_samples // set_size disjoint seed sets of `evaluate.set_size` images (null: the
  held-out split's size with the classifier, num_samples with inception): the headline `<key>` is the mean of the K
  set FDs and `<key>_std` their sample std, so the number and its error bar come from the same sets, at the same
  sample size as the data floor. With K = 1 (the Inception protocol's one set of 50,000) `<key>` is that set's FD
  and `<key>_std` the std of `evaluate.num_bootstrap` bootstrap replicates (basic 95 % interval in the details).
  Each FD uses scipy's sqrtm when the set has more images than feature dimensions, else the exact eigh form
  (`PreparedReference`). KID (cubic polynomial kernel) for every method is in fd_details.json (against a
  2,000-image subset of the reference features for `inception` with a data reference; none against a fetched npz,
  which holds no features). See `ctm_core.eval.scoring` and docs/evaluation.md#error-bars.
* Bits/dim is not computed here: it is the `likelihood` stage (pipelines/likelihood.py, section `likelihood`), so
  changing FD params does not recompute the expensive ODE likelihood.

Outputs (`--out`, built in a temporary folder and renamed into place: all or nothing):
    metrics.json            the headline, what `dvc metrics show` prints: fd_nfe{n} ± fd_nfe{n}_std (γ = 0) for
                            each NFE, fd_teacher_heun{n} ± _std, fd_teacher_euler{n}, fd_heldout_vs_train (the data
                            floor), complete (true iff everything ran)
    fd_details.json         every number (`metrics`: fd_nfe{n}_gamma{g:g}, fd_student_heun{n}, ratios
                            fd_nfe1_over_teacher_*, <key>_over_floor, kid_nfe1, classifier_accuracy, set_size,
                            num_sets, num_reference, ...), per-method details (seed-set FDs, bootstrap, KID,
                            timings), classifier / inception, reference, protocol
    protocol.json           what makes two FDs comparable: features, feature_net_sha256 (Inception file /
                            classifier tensors), feature_dim, reference_source, reference_sha256 (npz file /
                            classifier statistics content), num_samples, set_size, seed_start, preprocessing; plus
                            its canonical-JSON sha256 `protocol_sha256` (also in fd_details.json "protocol").
    fd_vs_nfe.csv           gamma,nfe,fd,fd_std: the γ-sampler curves (long format, any evaluate.gammas)
    fd_vs_nfe.png           FD vs NFE (log scale), one colour per γ with error bars, teacher and data-floor lines:
                            the image `dvc plots show` renders
    grids/<method>.png      grid_size² samples of each method (first seeds) and grids/data.png (across classes)
    classifier/             the feature classifier (safetensors + config; features: classifier only)

MLflow: everything above is logged to the distill run (`mlflow_run_id` in <student>/run.json) when it exists in the
tracking store, else to an `evaluate-<params hash>` run (pipelines.support.tracking). Exit codes: 0 ok, 2 bad params or
missing inputs (one line on stderr, nothing written), 1 failure during the work (nothing written).
"""

from __future__ import annotations

import logging
import sys

from pipelines.support.evaluation import evaluate
from pipelines.support.stage_common import InputError, check_inputs, run_scoring_stage

__all__ = ["InputError", "check_inputs", "evaluate", "main"]

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    return run_scoring_stage(
        argv,
        prog="python -m pipelines.evaluate",
        description=__doc__.split("\n\n")[0],
        run=evaluate,
        summary_keys=lambda params: ("fd_nfe1", f"fd_teacher_heun{params.evaluate.teacher_nfe}", "complete"),
        log=logger,
    )


if __name__ == "__main__":
    sys.exit(main())
