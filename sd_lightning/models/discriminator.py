"""Adversarial pieces for the autoencoder stage (as latent diffusion trained its VAE, Rombach et al. 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017): one real/fake logit per image patch, so it judges local texture."""

    def __init__(self, in_channels: int = 3, channels: int = 32, num_layers: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        width = channels
        for index in range(1, num_layers):
            next_width = channels * min(2**index, 8)
            stride = 2 if index < num_layers - 1 else 1
            layers += [nn.Conv2d(width, next_width, 4, stride=stride, padding=1, bias=False),
                       nn.GroupNorm(min(32, next_width // 4), next_width), nn.LeakyReLU(0.2)]
            width = next_width
        layers.append(nn.Conv2d(width, 1, 4, stride=1, padding=1))
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """½·(E[relu(1 - D(x))] + E[relu(1 + D(x̂))]) (Lim & Ye 2017)."""
    return 0.5 * (F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean())


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    return -fake_logits.mean()


def adaptive_generator_weight(reconstruction_loss: torch.Tensor, generator_loss: torch.Tensor,
                              last_layer: torch.Tensor, max_weight: float = 1e4) -> torch.Tensor:
    """‖∇_L rec‖ / ‖∇_L gan‖ at the decoder's last layer L (Esser et al. 2021, eq. 7): balances the GAN term
    against reconstruction whatever their scales."""
    rec_grad = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    gan_grad = torch.autograd.grad(generator_loss, last_layer, retain_graph=True)[0]
    return (rec_grad.norm() / (gan_grad.norm() + 1e-4)).clamp(0.0, max_weight).detach()


class FeaturePerceptualLoss(nn.Module):
    """Mean squared distance between features of a local, frozen feature network (LPIPS-like).

    ``network`` is any module mapping images in [-1, 1] to a feature tensor (or a list of them); nothing is
    downloaded, so it must come from a local file or be built from code.
    """

    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network.eval().requires_grad_(False)

    def train(self, mode: bool = True) -> FeaturePerceptualLoss:
        super().train(mode)
        self.network.eval()
        return self

    def forward(self, reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        ours, theirs = self.network(reconstruction), self.network(target)
        if isinstance(ours, torch.Tensor):
            ours, theirs = [ours], [theirs]
        return sum(F.mse_loss(a, b) for a, b in zip(ours, theirs)) / len(ours)


def load_torchscript_features(path: str) -> nn.Module:
    """A local TorchScript feature network (e.g. a VGG trunk exported elsewhere), for FeaturePerceptualLoss."""
    return torch.jit.load(path, map_location="cpu")


def small_conv_features(in_channels: int = 3, seed: int = 0) -> nn.Module:
    """A fixed random conv feature stack: a stand-in perceptual network when no pretrained one is at hand."""
    generator = torch.Generator().manual_seed(seed)
    network = nn.Sequential(nn.Conv2d(in_channels, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, stride=2, padding=1),
                            nn.ReLU())
    with torch.no_grad():
        for parameter in network.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    return network
