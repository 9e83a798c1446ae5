"""AutoencoderModule: stage 1 of latent diffusion, an AutoencoderKL trained on reconstruction + KL."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from torchmetrics import MeanSquaredError
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from sd_lightning.data.split import stable_seed
from sd_lightning.models.discriminator import (
    adaptive_generator_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
)
from sd_lightning.optim import configure_optimization


class AutoencoderModule(L.LightningModule):
    """Trains a VAE for a new image domain: L1 + MSE (+ perceptual) reconstruction and a small KL term.

    With a ``discriminator`` it adds the adversarial stage latent diffusion used for its autoencoder: a
    PatchGAN with hinge loss, switched on at ``disc_start_step`` and weighted adaptively against the
    reconstruction loss. That needs two optimizers, so it uses Lightning's manual optimization, where
    Trainer-level gradient clipping does not apply: ``gradient_clip_val`` clips inside the step instead.
    """

    def __init__(
        self,
        vae: AutoencoderKL,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        l1_weight: float = 1.0,
        mse_weight: float = 1.0,
        kl_weight: float = 1e-6,
        seed: int = 0,
        discriminator: torch.nn.Module | None = None,
        disc_weight: float = 0.5,
        disc_start_step: int = 0,
        perceptual: torch.nn.Module | None = None,
        perceptual_weight: float = 0.1,
        gradient_clip_val: float | None = None,
    ) -> None:
        super().__init__()
        self.vae = vae
        self.discriminator = discriminator
        self.disc_weight, self.disc_start_step = disc_weight, disc_start_step
        self.perceptual, self.perceptual_weight = perceptual, perceptual_weight
        self.gradient_clip_val = gradient_clip_val
        self.automatic_optimization = discriminator is None
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.l1_weight, self.mse_weight, self.kl_weight = l1_weight, mse_weight, kl_weight
        self.seed = seed
        self.val_mse = MeanSquaredError().set_dtype(torch.float64)
        self.val_psnr = PeakSignalNoiseRatio(data_range=2.0).set_dtype(torch.float64)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=2.0).set_dtype(torch.float64)
        self.save_hyperparameters({"l1_weight": l1_weight, "mse_weight": mse_weight, "kl_weight": kl_weight, "seed": seed,
                                   "adversarial": discriminator is not None, "disc_weight": disc_weight,
                                   "disc_start_step": disc_start_step, "perceptual": perceptual is not None})

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.vae.parameters())

    def forward(self, pixel_values: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, Any]:
        posterior = self.vae.encode(pixel_values).latent_dist
        if generator is None:
            latents = posterior.mode()
        else:
            latents = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
        return self.vae.decode(latents).sample, posterior

    def reconstruction_losses(self, pixel_values: torch.Tensor, generator: torch.Generator) -> dict[str, Any]:
        reconstruction, posterior = self(pixel_values, generator)
        terms = {
            "l1": F.l1_loss(reconstruction, pixel_values),
            "mse": F.mse_loss(reconstruction, pixel_values),
            "kl": posterior.kl().mean() / pixel_values[0].numel(),
        }
        rec = self.l1_weight * terms["l1"] + self.mse_weight * terms["mse"]
        if self.perceptual is not None:
            terms["perceptual"] = self.perceptual(reconstruction, pixel_values)
            rec = rec + self.perceptual_weight * terms["perceptual"]
        return {"reconstruction": reconstruction, "rec": rec, **terms}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        pixel_values = batch["pixel_values"]
        if pixel_values.shape[0] == 0:
            return None
        generator = torch.Generator().manual_seed(
            stable_seed(self.seed, "vae", self.current_epoch, batch_idx, self.global_rank)
        )
        out = self.reconstruction_losses(pixel_values, generator)
        loss = out["rec"] + self.kl_weight * out["kl"]
        size = pixel_values.shape[0]
        logged = {f"train/{k}": out[k] for k in ("l1", "mse", "kl", "perceptual") if k in out}
        if self.discriminator is not None:
            return self._adversarial_step(pixel_values, out, loss, logged, size)
        if not torch.isfinite(loss):
            return None  # NonFiniteGuardCallback counts the skipped step
        self.log_dict({"train/loss": loss, **logged}, batch_size=size)
        self.log("train/loss_step", loss, prog_bar=True, logger=False, batch_size=size)
        return loss

    def _adversarial_step(self, pixel_values: torch.Tensor, out: dict[str, Any], loss: torch.Tensor,
                          logged: dict[str, torch.Tensor], size: int) -> torch.Tensor:
        opt_g, opt_d = self.optimizers()
        adversarial = self.global_step >= self.disc_start_step
        if adversarial:
            g_loss = hinge_generator_loss(self.discriminator(out["reconstruction"]))
            weight = self.disc_weight * adaptive_generator_weight(out["rec"], g_loss, self.vae.decoder.conv_out.weight)
            loss = loss + weight * g_loss
            logged.update({"train/g_loss": g_loss, "train/disc_weight": weight})
        opt_g.zero_grad()
        self.manual_backward(loss)
        if self.gradient_clip_val:
            self.clip_gradients(opt_g, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
        opt_g.step()
        if adversarial:
            d_loss = hinge_discriminator_loss(self.discriminator(pixel_values),
                                              self.discriminator(out["reconstruction"].detach()))
            opt_d.zero_grad()
            self.manual_backward(d_loss)
            if self.gradient_clip_val:
                self.clip_gradients(opt_d, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm="norm")
            opt_d.optimizer.step()  # the raw optimizer: one global step per batch, not two
            logged["train/d_loss"] = d_loss
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for scheduler in schedulers if isinstance(schedulers, list) else [schedulers]:
                scheduler.step()
        self.log_dict({"train/loss": loss, **logged}, batch_size=size)
        return loss.detach()

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        pixel_values = batch["pixel_values"]
        if pixel_values.shape[0] == 0:
            return
        reconstruction, _ = self(pixel_values)
        self.val_mse.update(reconstruction.double().flatten(), pixel_values.double().flatten())
        self.val_psnr.update(reconstruction.double().clamp(-1, 1), pixel_values.double())
        self.val_ssim.update(reconstruction.double().clamp(-1, 1), pixel_values.double())

    def on_validation_epoch_end(self) -> None:
        self.log_dict({"val/mse": self.val_mse.compute().float(), "val/psnr": self.val_psnr.compute().float(),
                       "val/ssim": self.val_ssim.compute().float()})
        self.val_mse.reset()
        self.val_psnr.reset()
        self.val_ssim.reset()

    @torch.no_grad()
    def compute_latent_statistics(self, batches: Iterable[dict[str, Any]],
                                  max_batches: int | None = None) -> LatentStatistics:
        """Mean and std of the training latents (posterior samples drawn with a fixed seed), overall and per channel."""
        was_training = self.training
        self.eval()
        total = total_sq = None
        count = 0
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "scaling"))
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            posterior = self.vae.encode(batch["pixel_values"].to(self.device)).latent_dist
            noise = torch.randn(posterior.mean.shape, generator=generator).to(posterior.mean)
            latents = (posterior.mean + posterior.std * noise).double()
            sums, squares = latents.sum(dim=(0, 2, 3)), latents.pow(2).sum(dim=(0, 2, 3))
            total = sums if total is None else total + sums
            total_sq = squares if total_sq is None else total_sq + squares
            count += latents.numel() // latents.shape[1]
        self.train(was_training)
        if count == 0:
            raise RuntimeError("cannot compute the VAE latent statistics: the training split is empty")
        mean = total / count
        std = (total_sq / count - mean.pow(2)).clamp_min(1e-12).sqrt()
        overall_mean = total.sum() / (count * len(total))
        overall_var = total_sq.sum() / (count * len(total)) - overall_mean.pow(2)
        return LatentStatistics(mean=mean.tolist(), std=std.tolist(), overall_mean=float(overall_mean),
                                overall_std=float(overall_var.clamp_min(1e-12).sqrt()))

    def compute_scaling_factor(self, batches: Iterable[dict[str, Any]], max_batches: int | None = None) -> float:
        """1 / std of the training latents, the number SD 1.x hard-codes as 0.18215 for its own VAE."""
        return 1.0 / self.compute_latent_statistics(batches, max_batches).overall_std

    def configure_optimizers(self) -> Any:
        if self.discriminator is not None:
            generator = configure_optimization(self.optimizer_factory, self.lr_scheduler_factory,
                                               self.trainable_parameters(), int(self.trainer.max_steps))
            disc_optimizer = self.optimizer_factory(params=list(self.discriminator.parameters()))
            if isinstance(generator, dict):
                return [generator["optimizer"], disc_optimizer], [generator["lr_scheduler"]]
            return [generator, disc_optimizer]
        return configure_optimization(
            self.optimizer_factory,
            self.lr_scheduler_factory,
            self.trainable_parameters(),
            int(self.trainer.estimated_stepping_batches),
        )


@dataclass(frozen=True)
class LatentStatistics:
    """Per-channel mean/std of the training latents and the mean/std over all channels."""

    mean: list[float]
    std: list[float]
    overall_mean: float
    overall_std: float


@torch.no_grad()
def fold_latent_standardization(vae: AutoencoderKL, mean: Sequence[float], std: Sequence[float]) -> None:
    """Make ``vae`` encode to per-channel standardized latents ``(z - mean) / std`` and decode them, in place.

    The affine map goes into the two 1x1 convolutions around the latent (``quant_conv`` produces the posterior's
    mean and log-variance, ``post_quant_conv`` reads the latent), so it is exact and any plain diffusers pipeline
    that loads the folder gets it; the caller sets ``scaling_factor`` to 1.
    """
    if vae.quant_conv is None or vae.post_quant_conv is None:
        raise ValueError("per-channel latent standardization needs a VAE with quant_conv and post_quant_conv "
                         "(use_quant_conv / use_post_quant_conv in its config)")
    channels = vae.config.latent_channels
    if len(mean) != channels or len(std) != channels:
        raise ValueError(f"latent statistics have {len(mean)} means / {len(std)} stds for {channels} latent channels")
    weight = vae.quant_conv.weight
    mu = torch.tensor(mean, dtype=torch.float64)
    sigma = torch.tensor(std, dtype=torch.float64)
    if bool((sigma <= 0).any()):
        raise ValueError(f"latent stds must be positive, got {std}")
    quant_w, quant_b = weight.double(), vae.quant_conv.bias.double()
    quant_w[:channels] /= sigma.view(-1, 1, 1, 1)
    quant_b[:channels] = (quant_b[:channels] - mu) / sigma
    quant_b[channels:] -= 2.0 * sigma.log()
    vae.quant_conv.weight.copy_(quant_w)
    vae.quant_conv.bias.copy_(quant_b)
    post_w, post_b = vae.post_quant_conv.weight.double(), vae.post_quant_conv.bias.double()
    vae.post_quant_conv.bias.copy_(post_b + post_w[:, :, 0, 0] @ mu)
    vae.post_quant_conv.weight.copy_(post_w * sigma.view(1, -1, 1, 1))
