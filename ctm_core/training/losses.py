"""CTM training losses: the CTM trajectory loss, the teacher's k-step Heun solver, DSM and adaptive weights.

Kim et al., "Consistency Trajectory Models", ICLR 2024 (arXiv 2310.02279), Algorithm 1 and eq. (8)-(10), in the
semantics of the official code (docs/ctm.md#2-training-step; Kim-Dongjun/ctm-cifar10 cm/karras_diffusion.py:183-205,
249-291, 384-410, 450-554; cm/resample.py:47-94, 206-229):

    k ~ P(k) ∝ k on {1..K}                      (one k per iteration, shared by the batch)
    n ~ U{0..N-1-k}, m ~ U{n+k..N-1};  t = t_n, u = t_{n+k}, s = t_m      (N-point Karras grid, t_0 = σ_max)
    x_t = x_0 + t·ε
    x_est = G_θ⁻( G_θ(x_t, t, s), s, σ_min )                   (grad flows through θ⁻'s input, not its params)
    x_u   = Heun_φ^k(x_t; t_n → t_{n+k})                        (2k teacher calls, no grad)
    x_tgt = G_θ⁻( G_sg(θ)(x_u, u, s), s, σ_min )               (online weights under no_grad, then θ⁻)
    L_CTM = d(x_est, x_tgt)
    L_DSM = λ(σ)·mean_CHW (g_θ(x_0 + σε', σ, σ) − x_0)²,  λ(σ) = (σ² + σ_d²)/(σ·σ_d)²
    loss  = mean L_CTM + w_DSM · λ_DSM · mean L_DSM,  λ_DSM = ‖∇_W L_CTM‖/(‖∇_W L_DSM‖ + 1e-4) ∈ [0, 1e4]

Shapes: x0, x_t: (B, ...) (images (B, C, H, W) or vectors (B, D)); t, u, s, sigma: (B,).
Protocols: ``student`` has ``G(x_t, t, s, class_labels=None)``, ``g(...)``, ``last_layer_weight()`` and
``sigma_min``/``sigma_max``/``sigma_data``; ``teacher`` is a denoiser ``D(x, sigma, class_labels=None)``.
All randomness comes from an injected ``torch.Generator``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ctm_core.diffusion.samplers import heun_step
from ctm_core.diffusion.schedules import karras_interp, karras_sigmas
from ctm_core.nets.utils import append_dims, check_in
from ctm_core.training.final_grads import FinalGrads

__all__ = [
    "DISTANCES",
    "MODES",
    "CTMLossOutput",
    "karras_grid",
    "sample_num_heun_steps",
    "sample_ctm_indices",
    "teacher_heun_solve",
    "ctm_distance",
    "ctm_loss",
    "ctm_estimate",
    "dsm_sigmas",
    "dsm_loss",
    "adaptive_weight",
    "ctm_dsm_loss",
    "ctm_dsm_backward",
]

DISTANCES = ("l2", "pseudo_huber", "lpips")
MODES = ("ctm", "cm")
LPIPS_RESOLUTION = 224  # both images are upsampled bilinearly to 224² before LPIPS (C karras_diffusion.py:357-362)


# The N-point Karras grid t_0 = σ_max > … > t_{N-1} = σ_min in float64 (docs/ctm.md#0-notation-and-time-grid):
# karras_grid(N, σ_min, σ_max, ρ).
karras_grid = karras_sigmas


# ---------------------------------------------------------------------------------------------------------------
# Sampling of k, t, u, s (docs/ctm.md#21-drawing-k, docs/ctm.md#22-times-t-u-s)


def sample_num_heun_steps(K: int, generator: torch.Generator) -> int:
    """k ~ P(k) ∝ k on {1..K} ('weighted' heun_step_strategy; C cm/karras_diffusion.py:143-152)."""
    if K < 1:
        raise ValueError(f"K must be >= 1, got {K!r}")
    weights = torch.arange(1, K + 1, dtype=torch.float64)
    return int(torch.multinomial(weights, 1, generator=generator).item()) + 1


def sample_ctm_indices(
    batch: int, N: int, k: int, generator: torch.Generator, *, mode: str = "ctm"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample grid indices (n, m): n ~ U{0..N-1-k}, m ~ U{n+k..N-1} (C cm/resample.py:47-94).

    ``mode='cm'`` fixes m = N-1 (s = σ_min, a consistency-model ablation). Returns two int64 (B,) tensors.
    """
    if not 1 <= k <= N - 1:
        raise ValueError(f"k must be in [1, N-1={N - 1}], got {k!r}")
    check_in("mode", mode, MODES)
    n = torch.randint(0, N - k, (batch,), generator=generator, dtype=torch.int64)  # (B,)
    if mode == "cm":
        m = torch.full_like(n, N - 1)
    else:
        low = n + k
        m = low + torch.floor(torch.rand(batch, generator=generator, dtype=torch.float64) * (N - low)).long()
        m = torch.minimum(m, torch.full_like(m, N - 1))  # guards a rand() of exactly 1 - ulp rounding up
    return n, m


# ---------------------------------------------------------------------------------------------------------------
# Teacher solver (docs/ctm.md#23-teacher-solver)


@torch.no_grad()
def teacher_heun_solve(
    teacher: Callable,
    x_t: torch.Tensor,
    grid: torch.Tensor,
    n: torch.Tensor,
    k: int,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """k Heun (EDM 2nd-order) steps of the teacher's PF-ODE along the grid, from t_n to t_{n+k}, per sample.

    EDM Algorithm 1 with S_churn = 0 (Karras et al. 2022), every step 2nd order (t_{n+k} ≥ σ_min > 0), so
    exactly 2k teacher calls on the whole batch (C cm/karras_diffusion.py:183-205). The trajectory is kept in
    float64; the teacher sees ``x_t.dtype``.

    Args:
        x_t: (B, ...) noisy samples at t_n. grid: (N,) float64 Karras grid. n: (B,) int64 start indices.
    Returns:
        x_u: (B, ...) in ``x_t.dtype``.
    """
    dtype = x_t.dtype

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return teacher(x.to(dtype), sigma.to(dtype), class_labels=class_labels).to(torch.float64)

    x = x_t.to(torch.float64)
    grid = grid.to(device=x_t.device, dtype=torch.float64)
    for j in range(k):
        x = heun_step(denoise, x, grid[n + j], grid[n + j + 1])  # per-sample t_{n+j} -> t_{n+j+1}, (B,) each
    return x.to(dtype)


# ---------------------------------------------------------------------------------------------------------------
# Distances (docs/ctm.md#24-ctm-loss)


def ctm_distance(
    x: torch.Tensor, y: torch.Tensor, distance: str = "l2", *, lpips: Callable | None = None
) -> torch.Tensor:
    """Per-sample distance d(x, y): (B, ...) x (B, ...) -> (B,).

    - ``'l2'``: mean over all non-batch dims of (x − y)².
    - ``'pseudo_huber'``: sqrt(‖x − y‖² + c²) − c with c = 0.00054·sqrt(D), D = numel per sample
      (Song & Dhariwal 2023, "Improved Techniques for Training Consistency Models", §3.3).
    - ``'lpips'``: ``lpips(up(x), up(y))`` with images in [-1, 1] bilinearly upsampled to 224² when smaller
      (C cm/karras_diffusion.py:357-362); the caller's module maps [-1, 1] to its own input range.
    """
    check_in("distance", distance, DISTANCES)
    if x.shape != y.shape:
        raise ValueError(f"ctm_distance: shapes differ, x {tuple(x.shape)} vs y {tuple(y.shape)}")
    B = x.shape[0]
    diff = (x - y).reshape(B, -1)
    if distance == "l2":
        return diff.square().mean(dim=1)
    if distance == "pseudo_huber":
        c = 0.00054 * math.sqrt(diff.shape[1])
        return (diff.square().sum(dim=1) + c * c).sqrt() - c
    if lpips is None:
        raise ValueError("distance='lpips' needs an LPIPS module: pass lpips=<callable on (B, 3, 224, 224) in [-1, 1]>")
    if x.ndim != 4:
        raise ValueError(f"distance='lpips' needs images (B, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-1] < 256:  # the official code resizes whenever H < 256
        x = F.interpolate(x, size=(LPIPS_RESOLUTION, LPIPS_RESOLUTION), mode="bilinear", align_corners=False)
        y = F.interpolate(y, size=(LPIPS_RESOLUTION, LPIPS_RESOLUTION), mode="bilinear", align_corners=False)
    return lpips(x, y).reshape(B)


# ---------------------------------------------------------------------------------------------------------------
# CTM loss (docs/ctm.md#24-ctm-loss)


@dataclass
class CTMLossOutput:
    """Per-sample CTM loss and the tensors a GAN phase needs (x_est is the fake, docs/ctm.md#26-gan-phase)."""

    loss: torch.Tensor  # (B,)
    x_est: torch.Tensor  # (B, ...) with grad
    x_target: torch.Tensor  # (B, ...) detached
    t: torch.Tensor  # (B,)
    u: torch.Tensor  # (B,)
    s: torch.Tensor  # (B,)


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host-drawn tensor on ``device``, the same values. To CUDA through pinned memory, non-blocking: the host
    does not wait for the queued kernels (the draws stay on the CPU generator, so every device sees the same
    streams as the CPU)."""
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def _draw_times_and_noise(x0: torch.Tensor, k: int, generator: torch.Generator, grid: torch.Tensor, mode: str):
    """(n, t, u, s, x_t) for one microbatch: indices from ``sample_ctm_indices``, then ε; x_t = x0 + t·ε."""
    B, N = x0.shape[0], grid.shape[0]
    device, dtype = x0.device, x0.dtype
    n, m = sample_ctm_indices(B, N, k, generator, mode=mode)
    grid_d = _to_device(grid, device)
    n, m = _to_device(n, device), _to_device(m, device)
    t, u, s = grid_d[n].to(dtype), grid_d[n + k].to(dtype), grid_d[m].to(dtype)  # (B,) each
    eps = _to_device(torch.randn(x0.shape, generator=generator, dtype=dtype, device="cpu"), device)
    return n, t, u, s, x0 + append_dims(t, x0.ndim) * eps


def ctm_estimate(
    student,
    target,
    x0: torch.Tensor,
    k: int,
    generator: torch.Generator,
    *,
    grid: torch.Tensor,
    sigma_min: float,
    class_labels: torch.Tensor | None = None,
    mode: str = "ctm",
) -> torch.Tensor:
    """Only the CTM estimate x_est = G_θ⁻(G_θ(x_t, t, s), s, σ_min) (the GAN fake; no teacher calls).

    Draws the same random numbers, in the same order, as ``ctm_loss``. (B, ...) -> (B, ...).
    """
    _, t, _, s, x_t = _draw_times_and_noise(x0, k, generator, grid, mode)
    x_s = student.G(x_t, t, s, class_labels=class_labels)
    return target.G(x_s, s, torch.full_like(t, sigma_min), class_labels=class_labels)


def ctm_loss(
    student,
    target,
    teacher: Callable,
    x0: torch.Tensor,
    k: int,
    generator: torch.Generator,
    *,
    grid: torch.Tensor,
    sigma_min: float,
    class_labels: torch.Tensor | None = None,
    distance: str = "l2",
    lpips: Callable | None = None,
    mode: str = "ctm",
    checkpoint_inner: bool = False,
) -> CTMLossOutput:
    """CTM loss for one microbatch with a given (iteration-wide) k.

    ``target`` is the EMA network θ⁻ with ``requires_grad=False`` parameters; it is *not* called under
    no_grad for the estimate, so gradients reach θ through its input (docs/ctm.md#82-two-stop-gradient-nets). The inner
    jump of the target uses the online ``student`` under no_grad. x0: (B, ...); grid: (N,) float64.
    ``checkpoint_inner`` recomputes the estimate's inner jump G_θ(x_t, t, s) in the backward instead of keeping its
    activations (non-reentrant checkpoint: the dropout masks replay, the values and gradients are the same).
    """
    n, t, u, s, x_t = _draw_times_and_noise(x0, k, generator, grid, mode)
    grid_d = _to_device(grid, x0.device)
    s_end = torch.full_like(t, sigma_min)  # jumps to data end at σ_min, not 0 (docs/ctm.md#81-sigma_min-endpoint)

    # Estimate: grad through G_θ and through θ⁻'s input (C karras_diffusion.py:249-265).
    if checkpoint_inner and torch.is_grad_enabled():
        x_s = checkpoint(lambda x, a, b: student.G(x, a, b, class_labels=class_labels), x_t, t, s, use_reentrant=False)
    else:
        x_s = student.G(x_t, t, s, class_labels=class_labels)
    x_est = target.G(x_s, s, s_end, class_labels=class_labels)

    # Target: teacher k Heun steps, online inner jump (no grad), θ⁻ outer jump (C karras_diffusion.py:270-286).
    with torch.no_grad():
        x_u = teacher_heun_solve(teacher, x_t, grid_d, n, k, class_labels=class_labels)
        x_hat_s = student.G(x_u, u, s, class_labels=class_labels)
        x_target = target.G(x_hat_s, s, s_end, class_labels=class_labels).detach()

    loss = ctm_distance(x_est.float(), x_target.float(), distance, lpips=lpips)
    return CTMLossOutput(loss=loss, x_est=x_est, x_target=x_target, t=t, u=u, s=s)


# ---------------------------------------------------------------------------------------------------------------
# DSM loss (docs/ctm.md#25-dsm-loss)


def dsm_sigmas(
    batch: int,
    generator: torch.Generator,
    *,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    diffusion_mult: float = 0.7,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """'halflognormal' σ sampler (C cm/resample.py:206-229): (B,) with the first ⌊B/2⌋ σ = exp(P_mean + P_std·z)
    and the rest σ = (σ_max^{1/ρ} + v·(σ_min^{1/ρ} − σ_max^{1/ρ}))^ρ, v ~ U[0, diffusion_mult]."""
    half = batch // 2
    z = torch.randn(half, generator=generator, dtype=torch.float64)
    sigma_ln = (P_mean + P_std * z).exp()
    v = torch.rand(batch - half, generator=generator, dtype=torch.float64) * diffusion_mult
    sigma_karras = karras_interp(v, sigma_min, sigma_max, rho)
    return torch.cat([sigma_ln, sigma_karras]).to(dtype)


def dsm_loss(
    student,
    x0: torch.Tensor,
    generator: torch.Generator,
    *,
    sigma_data: float,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    class_labels: torch.Tensor | None = None,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    diffusion_mult: float = 0.7,
) -> torch.Tensor:
    """Per-sample DSM loss λ(σ)·mean (g_θ(x0 + σε, σ, σ) − x0)², λ = (σ²+σ_d²)/(σσ_d)²: (B, ...) -> (B,).

    The student is called with s = σ (C cm/karras_diffusion.py:384-410; docs/ctm.md#86-dsm-uses-s-equal-t).
    """
    B = x0.shape[0]
    sigma = dsm_sigmas(
        B,
        generator,
        sigma_min=sigma_min,
        sigma_max=sigma_max,
        rho=rho,
        P_mean=P_mean,
        P_std=P_std,
        diffusion_mult=diffusion_mult,
        dtype=x0.dtype,
    )
    sigma = _to_device(sigma, x0.device)
    eps = _to_device(torch.randn(x0.shape, generator=generator, dtype=x0.dtype, device="cpu"), x0.device)
    x_sigma = x0 + append_dims(sigma, x0.ndim) * eps
    denoised = student.g(x_sigma, sigma, sigma, class_labels=class_labels)
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2  # (B,)
    return weight * (denoised.float() - x0.float()).square().reshape(B, -1).mean(dim=1)


# ---------------------------------------------------------------------------------------------------------------
# Adaptive weight (docs/ctm.md#25-dsm-loss, docs/ctm.md#87-adaptive-weights)


def adaptive_weight(
    loss_main: torch.Tensor, loss_aux: torch.Tensor, weight: torch.Tensor, *, max_value: float = 1e4
) -> torch.Tensor:
    """λ = ‖∇_W loss_main‖ / (‖∇_W loss_aux‖ + 1e-4), clamped to [0, max_value] and detached (0-dim).

    Both losses are scalars (microbatch means); W = ``student.last_layer_weight()``. The graphs are retained
    for the following backward (C cm/karras_diffusion.py:103-108).
    """
    n_main = _last_layer_grad_norm(loss_main, weight)
    n_aux = _last_layer_grad_norm(loss_aux, weight)
    return _norm_ratio(n_main, n_aux, max_value)


def _last_layer_grad_norm(loss: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """‖∇_W loss‖ (0-dim; zero when ``loss`` does not depend on W), the graph retained."""
    (g,) = torch.autograd.grad(loss, weight, retain_graph=True, allow_unused=True)
    return g.norm() if g is not None else weight.new_zeros(())


def _norm_ratio(n_main: torch.Tensor, n_aux: torch.Tensor, max_value: float = 1e4) -> torch.Tensor:
    """clamp(n_main / (n_aux + 1e-4), 0, max_value), detached."""
    return (n_main / (n_aux + 1e-4)).clamp(0.0, max_value).detach()


def ctm_dsm_loss(
    student,
    target,
    teacher: Callable,
    x0: torch.Tensor,
    k: int,
    generator: torch.Generator,
    *,
    grid: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    sigma_data: float,
    class_labels: torch.Tensor | None = None,
    distance: str = "l2",
    lpips: Callable | None = None,
    mode: str = "ctm",
    ctm_weight: float = 1.0,
    dsm_weight: float = 1.0,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    diffusion_mult: float = 0.7,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], CTMLossOutput]:
    """Total G loss of one microbatch: ctm_weight·mean L_CTM + dsm_weight·λ_DSM·mean L_DSM (docs/ctm.md#27-total-loss).

    ``mode='cm'`` uses s = σ_min and no DSM term. Returns (scalar loss, detached metrics, CTM outputs).
    """
    check_in("mode", mode, MODES)
    ctm = ctm_loss(
        student,
        target,
        teacher,
        x0,
        k,
        generator,
        grid=grid,
        sigma_min=sigma_min,
        class_labels=class_labels,
        distance=distance,
        lpips=lpips,
        mode=mode,
    )
    l_ctm = ctm.loss.mean()
    total = ctm_weight * l_ctm
    metrics = {"loss_ctm": l_ctm.detach()}
    if mode == "ctm" and dsm_weight > 0:
        l_dsm = dsm_loss(
            student,
            x0,
            generator,
            sigma_data=sigma_data,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            class_labels=class_labels,
            P_mean=P_mean,
            P_std=P_std,
            diffusion_mult=diffusion_mult,
        ).mean()
        lam = adaptive_weight(l_ctm, l_dsm, student.last_layer_weight())
        total = total + dsm_weight * lam * l_dsm
        metrics["loss_dsm"] = l_dsm.detach()
        metrics["lambda_dsm"] = lam
    metrics["loss"] = total.detach()
    return total, metrics, ctm


def _shared_leaf_edges(root, params: list[torch.Tensor]) -> dict[int, list[tuple[object, int]]]:
    """For each parameter reached by more than one edge of the graph under ``root``: its (node, input index) edges.

    A parameter used twice in one forward (e.g. ``map_label`` for both the t and the s embedding) gets its
    contributions summed in the order the backward delivers them; the staged backward needs them one by one.
    """
    wanted = {id(p): i for i, p in enumerate(params)}
    edges: dict[int, list[tuple[object, int]]] = {}
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for idx, (nxt, _) in enumerate(node.next_functions):
            if nxt is None:
                continue
            var = getattr(nxt, "variable", None)
            if var is None:
                stack.append(nxt)
            elif id(var) in wanted:
                edges.setdefault(wanted[id(var)], []).append((node, idx))
    return {i: e for i, e in edges.items() if len(e) > 1}


def _exact_power_of_two(v: float) -> bool:
    """True when v = 2^e (finite, > 0): scaling a gradient by v is exact in binary floating point."""
    return v > 0 and math.isfinite(v) and math.frexp(v)[0] == 0.5


def _keep_input_grad(store: list[torch.Tensor], idx: int):
    """A node post-hook that appends a copy of the gradient it sends along input ``idx``."""

    def hook(grad_inputs, grad_outputs):
        if grad_inputs[idx] is not None:
            store.append(grad_inputs[idx].clone())

    return hook


def ctm_dsm_backward(
    student,
    target,
    teacher: Callable,
    x0: torch.Tensor,
    k: int,
    generator: torch.Generator,
    *,
    scale: float,
    grid: torch.Tensor,
    sigma_min: float,
    sigma_max: float,
    rho: float,
    sigma_data: float,
    class_labels: torch.Tensor | None = None,
    distance: str = "l2",
    lpips: Callable | None = None,
    mode: str = "ctm",
    ctm_weight: float = 1.0,
    dsm_weight: float = 1.0,
    P_mean: float = -1.2,
    P_std: float = 1.2,
    diffusion_mult: float = 0.7,
    checkpoint_inner: bool = True,
    on_final_grad: Callable[[torch.nn.Parameter], None] | None = None,
) -> tuple[dict[str, torch.Tensor], CTMLossOutput]:
    """Backpropagate ``scale``·(the ``ctm_dsm_loss`` total) of one microbatch into the student's ``.grad``, one graph
    at a time: the CTM graph is backpropagated and freed before the DSM forward is built.

    The same random draws in the same order, the same λ_DSM = ‖∇_W mean L_CTM‖/(‖∇_W mean L_DSM‖ + 1e-4)
    (docs/ctm.md#25-dsm-loss) and, on CPU, the bitwise-same accumulated gradient as
    ``(ctm_dsm_loss(...)[0] * scale).backward()``: each parameter's contributions are summed in the order one
    combined backward sums them (DSM first, then CTM; a parameter used twice per forward gets its CTM pieces one
    by one) and then added to the gradient already there. ‖∇_W L_CTM‖ is read from the CTM backward
    at W when that backward's seed scale·ctm_weight is a power of two (exact rescaling), otherwise from its own
    pass. ``on_final_grad(p)`` (optional) is called once per parameter as soon as its ``.grad`` is final, during
    the last pass where possible (``ctm_core.training.final_grads``; a gradient sync overlaps it with the backward).
    Returns (detached metrics as ``ctm_dsm_loss``, CTM outputs with ``x_est`` detached).
    """
    check_in("mode", mode, MODES)
    params = [p for p in student.parameters() if p.requires_grad]
    held = [p.grad for p in params]  # the earlier microbatches' sum, added back after this one's two terms
    for p in params:
        p.grad = None
    W = student.last_layer_weight()
    with_dsm = mode == "ctm" and dsm_weight > 0

    def add_held(i: int) -> None:  # this microbatch's gradient + the earlier microbatches' sum
        g = held[i]
        if g is not None:
            params[i].grad = g if params[i].grad is None else g.add_(params[i].grad)

    final = FinalGrads(params, on_final_grad, add_held)

    ctm = ctm_loss(
        student,
        target,
        teacher,
        x0,
        k,
        generator,
        grid=grid,
        sigma_min=sigma_min,
        class_labels=class_labels,
        distance=distance,
        lpips=lpips,
        mode=mode,
        checkpoint_inner=checkpoint_inner,
    )
    l_ctm = ctm.loss.mean()
    term_ctm = ctm_weight * l_ctm
    seed = float((torch.ones((), dtype=term_ctm.dtype) * scale) * ctm_weight)  # the gradient reaching l_ctm
    n_main: list[torch.Tensor] = []
    hook = None
    if with_dsm:
        if _exact_power_of_two(seed):
            hook = W.register_hook(lambda g: n_main.append((g / seed).norm()))
        else:
            n_main.append(_last_layer_grad_norm(l_ctm, W))
    # Parameters with several uses in the CTM graph: their CTM contributions one by one, in delivery order.
    pieces: dict[int, list[torch.Tensor]] = {}
    handles = [] if hook is None else [hook]
    if with_dsm:
        for i, edges in _shared_leaf_edges(term_ctm.grad_fn, params).items():
            pieces[i] = []
            for node, idx in edges:
                handles.append(node.register_hook(_keep_input_grad(pieces[i], idx)))
    try:
        with torch.autocast("cuda", enabled=False), final.during_last_backward() if not with_dsm else nullcontext():
            (term_ctm * scale).backward()
    finally:
        for h in handles:
            h.remove()
    for i in pieces:
        params[i].grad = None  # re-summed below in the one-backward order
    total = term_ctm.detach()
    metrics = {"loss_ctm": l_ctm.detach()}
    if with_dsm:
        if not n_main:  # W not reached by the CTM loss
            n_main.append(W.new_zeros(()))
        l_dsm = dsm_loss(
            student,
            x0,
            generator,
            sigma_data=sigma_data,
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            rho=rho,
            class_labels=class_labels,
            P_mean=P_mean,
            P_std=P_std,
            diffusion_mult=diffusion_mult,
        ).mean()
        lam = _norm_ratio(n_main[0], _last_layer_grad_norm(l_dsm, W))
        term_dsm = dsm_weight * lam * l_dsm
        with torch.autocast("cuda", enabled=False), final.during_last_backward(exclude=pieces):
            (term_dsm * scale).backward()
        total = total + term_dsm.detach()
        metrics["loss_dsm"] = l_dsm.detach()
        metrics["lambda_dsm"] = lam
    metrics["loss"] = total
    with torch.no_grad():
        # One backward of the summed loss delivers all DSM contributions first (its nodes are newer), then the
        # CTM ones: ((d₁ + d₂) + c₁) + c₂ for a parameter used twice; one use each sums as c + d (= d + c).
        for i, parts in pieces.items():
            acc = params[i].grad
            for c in parts:
                acc = c if acc is None else acc + c
            params[i].grad = acc
        final.rest()
    ctm.x_est = ctm.x_est.detach()
    return metrics, ctm
