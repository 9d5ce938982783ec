"""The CTM trainer: the loop of `ctm_core.training.loop` with the CTM + DSM objective (+ the optional GAN phase).

Per step (docs/ctm.md#2-training-step): one k ~ P(k) ∝ k shared by all microbatches and ranks, per-sample (t, u, s)
on the N-grid, the k-step teacher Heun solve, estimate and target through the EMA target network θ⁻, DSM with the
adaptive λ; after the optimizer step θ⁻ ← EMA(θ, `target_ema`). See `loop.py` for batching, keyed randomness,
data parallelism and checkpoints.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ctm_core.config import DistillParams
from ctm_core.training.ema import frozen_copy, update_ema_
from ctm_core.training.loop import (
    CHECKPOINT_FORMAT,
    TensorDataSource,
    Trainer,
    atomic_torch_save,
    build_optimizer,
    derive_seed,
    load_checkpoint_file,
    random_hflip,
)
from ctm_core.training.losses import (
    ctm_dsm_backward,
    ctm_dsm_loss,
    ctm_estimate,
    karras_grid,
    sample_num_heun_steps,
)

__all__ = [
    "CHECKPOINT_FORMAT",
    "CTMTrainer",
    "TensorDataSource",
    "Trainer",
    "atomic_torch_save",
    "build_optimizer",
    "derive_seed",
    "load_checkpoint_file",
]


def _lpips_on_signed_images(lpips: Callable | None) -> Callable | None:
    """``ctm_distance`` hands LPIPS images in [-1, 1]; ``ctm_core.gan.lpips.LPIPS`` expects [0, 1] (piq convention):
    wrap it with (x + 1)/2, unclamped (docs/ctm.md#24-ctm-loss), grey (B, 1, H, W) repeated to 3 channels. Other
    callables are used as given."""
    if lpips is None:
        return None
    try:
        from ctm_core.gan.lpips import LPIPS, as_rgb
    except ImportError:  # pragma: no cover - the module is optional
        return lpips
    if isinstance(lpips, LPIPS):
        module = lpips  # grey images: the channel repeated to RGB (as_rgb, docs/presets.md#lpips-weights)
        return lambda x, y: module((as_rgb(x) + 1) / 2, (as_rgb(y) + 1) / 2)
    return lpips


class CTMTrainer(Trainer):
    """CTM (+DSM) distillation of an EDM teacher into ``student`` (docs/ctm.md#2-training-step).

    The target network θ⁻ is a frozen copy of the student (kept in train mode, as in the official code) updated
    with rate ``config.target_ema`` after every step; ``lpips`` is the module for ``distance='lpips'``.
    The teacher is not stored in checkpoints. Without the GAN phase each microbatch is backpropagated one graph at a
    time (``ctm_dsm_backward``; ``checkpoint_inner_jump`` recomputes the estimate's inner jump in the backward), the
    same update as one backward of the summed loss at a fraction of the activation memory.
    """

    kind = "ctm"
    loss_fields = (
        "mode",
        "N",
        "K",
        "sigma_min",
        "sigma_max",
        "rho",
        "sigma_data",
        "ctm_weight",
        "dsm_weight",
        "P_mean",
        "P_std",
        "diffusion_mult",
        "distance",
    )

    def __init__(
        self,
        config: DistillParams,
        student: nn.Module,
        teacher: Callable,
        data,
        *,
        lpips: Callable | None = None,
        checkpoint_inner_jump: bool | None = None,
        **kwargs,
    ):
        if not isinstance(config, DistillParams):
            raise TypeError(f"config must be a DistillParams (ctm_core.config), got {type(config).__name__}")
        if config.distance == "lpips" and lpips is None:
            raise ValueError("distance: 'lpips' needs the lpips= module (fix: pass ctm_core.gan.lpips.LPIPS)")
        super().__init__(config, student, data, **kwargs)
        self.teacher = teacher
        if isinstance(teacher, nn.Module):
            teacher.eval().requires_grad_(False)
        self.lpips = _lpips_on_signed_images(lpips)
        if config.gan.enabled and (self.discriminator is None or self.d_optimizer is None):
            raise ValueError("gan.enabled=True needs discriminator= and d_optimizer= (see ctm_core.gan.objective)")
        # None: on CUDA, where activation memory bounds the batch; on CPU the recompute would only cost time.
        on_cuda = self.device.type == "cuda"
        self.checkpoint_inner_jump = on_cuda if checkpoint_inner_jump is None else bool(checkpoint_inner_jump)
        self.target = frozen_copy(self.model)
        self.target.train()
        c = config
        self.grid = karras_grid(c.N, c.sigma_min, c.sigma_max, c.rho)  # (N,) float64, CPU

    @property
    def student(self) -> nn.Module:
        return self.model

    def compile_modules(self) -> list[nn.Module]:
        # The teacher (2k of the ~2k+4 network calls per microbatch) belongs to the caller: compile it there.
        return [self.model, self.target]

    def iteration_context(self) -> dict[str, Any]:
        if self.config.gan.enabled and hasattr(self.discriminator, "power_iteration_"):
            self.discriminator.power_iteration_()  # spectral norm: once per step, the same on every rank
        return {"k": sample_num_heun_steps(self.config.K, self.keyed_generator("k"))}  # shared by all ranks

    def ema_rates(self) -> tuple[float, ...]:
        return tuple(self.config.eval_emas)

    def is_generator_step(self) -> bool:
        gan = self.config.gan
        return not gan.enabled or self.step % gan.g_learning_period == 0

    def _loss_kwargs(self) -> dict[str, Any]:
        c = self.config
        return dict(
            grid=self.grid,
            sigma_min=c.sigma_min,
            sigma_max=c.sigma_max,
            rho=c.rho,
            sigma_data=c.sigma_data,
            distance=c.distance,
            lpips=self.lpips,
            mode=c.mode,
            ctm_weight=c.ctm_weight,
            dsm_weight=c.dsm_weight,
            P_mean=c.P_mean,
            P_std=c.P_std,
            diffusion_mult=c.diffusion_mult,
        )

    def microbatch_backward(self, x0, labels, ctx, generator, scale, on_final_grad=None):
        if self.config.gan.enabled:  # the GAN term needs the CTM graph and comes after the DSM draws: one backward
            return super().microbatch_backward(x0, labels, ctx, generator, scale, on_final_grad)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_enabled):
            metrics, _ = ctm_dsm_backward(
                self.model,
                self.target,
                self.teacher,
                x0,
                ctx["k"],
                generator,
                scale=scale,
                class_labels=labels,
                checkpoint_inner=self.checkpoint_inner_jump,
                on_final_grad=on_final_grad,
                **self._loss_kwargs(),
            )
        return metrics

    def microbatch_loss(self, x0, labels, ctx, generator):
        loss, metrics, out = ctm_dsm_loss(
            self.model, self.target, self.teacher, x0, ctx["k"], generator, class_labels=labels, **self._loss_kwargs()
        )
        if self.config.gan.enabled:
            # G step of the GAN phase: + w_D·λ_GAN·mean(−D(x_est)) (C karras_diffusion.py:412-437, 529-543).
            from ctm_core.gan.objective import adaptive_gan_weight, g_loss

            l_g = g_loss(self.discriminator, out.x_est, generator)
            lam = adaptive_gan_weight(out.loss.mean(), l_g, self.model.last_layer_weight())
            loss = loss + self.config.gan.weight * lam * l_g
            metrics.update(loss_gan_g=l_g.detach(), lambda_gan=lam, loss=loss.detach())
        return loss, metrics

    def discriminator_step(self, x, labels, ctx):
        """D-only step: hinge loss on real x0 vs the detached CTM estimate, per microbatch; no EMA update."""
        from ctm_core.gan.objective import d_hinge_loss

        c, b = self.config, self.microbatch
        B = self.config.batch
        self.discriminator.train()
        self.d_optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), device=self.device)
        for j, i in enumerate(self.my_microbatches()):  # x: this rank's microbatches (Trainer._my_batch)
            xb = self._prepare(x[j * b : (j + 1) * b])
            lb = None if labels is None else labels[j * b : (j + 1) * b].to(self.device)
            generator = self.keyed_generator("loss", i)
            self._seed_dropout(i)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.autocast_enabled):
                with torch.no_grad():
                    fake = ctm_estimate(
                        self.model,
                        self.target,
                        xb,
                        ctx["k"],
                        generator,
                        grid=self.grid,
                        sigma_min=c.sigma_min,
                        class_labels=lb,
                        mode=c.mode,
                    )
                loss = d_hinge_loss(self.discriminator, xb, fake, generator)
            (loss * (b / B)).backward()
            total = total + loss.detach().float() * (b / B)
        if self.grad_sync is not None:
            self.grad_sync([p for p in self.discriminator.parameters() if p.requires_grad])
        sums = {"loss_gan_d": total}
        if self.metric_sync is not None:
            sums = self.metric_sync(sums)
        self.d_optimizer.step()
        sums["k"] = torch.tensor(float(ctx["k"]))
        return sums

    def augment_batch(self, x: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """`random_flip`: image b of the global batch is mirrored by a draw keyed by (seed, step, b), the same on every
        rank and after a resume (docs/presets.md#random-flips); x holds rows ``rows`` of it (None: all)."""
        if not self.config.random_flip:
            return x
        return random_hflip(x, self.keyed_generator("flip"), rows, self.config.batch)

    def after_optimizer_step(self) -> None:
        update_ema_(self.target, self.model, self.config.target_ema)
        self.emas.update(self.model)

    def extra_state(self) -> dict[str, Any]:
        return {"target": self.target.state_dict()}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        self.target.load_state_dict(state["target"])
