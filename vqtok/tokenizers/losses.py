"""The training objective of the VQGAN family: what "Taming Transformers for High-Resolution Image Synthesis"
(Esser et al. 2021, section 3.2) adds to the VQ-VAE's loss, with the settings LlamaGen ("Autoregressive Model
Beats Diffusion", Sun et al. 2024, section 2.1) and Open-MAGVIT2 (Luo et al. 2024) train with. Every term is
computed on images in [-1, 1], as theirs are, so that their published weights (`ObjectiveConfig`) carry over:

    pixel        L1 (taming) or L2 (LlamaGen), the mean over pixels
    perceptual   LPIPS between images and reconstructions; the training loop passes the network in
    quantizer    the vector quantizer's codebook + beta * commitment loss, as it returns it
    entropy      codebook usage (LlamaGen's `compute_entropy_loss`, from MAGVIT): each vector's softmax over its
                 negative distances to the codes should be sharp, and their batch mean flat (`entropy_loss`)
    adversarial  a PatchGAN discriminator (pix2pix's, as taming's `NLayerDiscriminator`) with a hinge or
                 non-saturating loss, off before `disc_start` (taming's `adopt_weight`). The generator's term is
                 weighted by disc_weight times taming's adaptive weight, the ratio of the reconstruction terms'
                 gradient norm to its own at the decoder's last layer (`adaptive_weight`), or by disc_weight
                 alone where that is switched off (LlamaGen's default)
    LeCAM        a regulariser of the discriminator ("Regularizing Generative Adversarial Networks under Limited
                 Data", Tseng et al. 2021, as Open-MAGVIT2 uses it) that keeps its outputs near moving averages
                 of its past outputs (`lecam_regularizer`)

`Objective` composes them; the training loop calls, each step,

    loss, logs = objective.generator_loss(x, x_rec, quantizer_loss, distances, last_layer, step, perceptual)
    d_loss, d_logs = objective.discriminator_loss(x, x_rec, step)   # when objective.discriminator is not None

with x and x_rec (B, C, H, W) in [-1, 1]. The generator's loss passes gradients into the discriminator's
parameters too (as taming's and LlamaGen's do): zero them before its own backward.

Where the references differ, this follows taming: the discriminator's loss is not scaled by disc_weight
(LlamaGen's is, which changes Adam's steps only through its epsilon and gradient clipping), and it is computed
before disc_start and multiplied by 0. The generator's side skips the discriminator before disc_start, where
taming's computes it and multiplies it by 0: the same loss and gradients. The non-saturating generator loss is
-log sigmoid(logits); LlamaGen's function of that name swaps the arguments of its cross-entropy, which makes it
the hinge loss plus a constant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vqtok.config import ObjectiveConfig
from vqtok.distributed import in_process_group

# -- the terms -----------------------------------------------------------------

PIXEL_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss}


def pixel_loss(images: torch.Tensor, reconstructions: torch.Tensor, kind: str) -> torch.Tensor:
    """The mean absolute (l1) or squared (l2) error over every pixel, in full precision."""
    return PIXEL_LOSSES[kind](reconstructions.float(), images.float())


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's hinge loss, halved as taming's: patches of real images pushed above 1, fakes below -1."""
    return 0.5 * (F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean())


def non_saturating_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """The discriminator's cross-entropy, real patches labelled 1 and fakes 0, halved (taming's "vanilla"):
    -log sigmoid(real) = softplus(-real) and -log(1 - sigmoid(fake)) = softplus(fake)."""
    return 0.5 * (F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """The generator's side of the hinge game: raise the discriminator's logits on reconstructions."""
    return -logits_fake.mean()


def non_saturating_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """-log sigmoid(fake): the fakes labelled real, whose gradient does not vanish where the discriminator is sure
    (Goodfellow et al. 2014, section 3)."""
    return F.softplus(-logits_fake).mean()


DISCRIMINATOR_LOSSES = {"hinge": hinge_d_loss, "non-saturating": non_saturating_d_loss}
GENERATOR_LOSSES = {"hinge": hinge_g_loss, "non-saturating": non_saturating_g_loss}


def adaptive_weight(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> torch.Tensor:
    """taming's adaptive weight (its section 3.2, lambda): ||grad rec_loss|| / (||grad g_loss|| + 1e-4) at the
    decoder's last layer's weight, clamped to [0, 1e4] and detached, so the adversarial term's gradient there is
    as large as the reconstruction's. Both gradients keep the graph for the backward that follows."""
    (rec_grad,) = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)
    (g_grad,) = torch.autograd.grad(g_loss, last_layer, retain_graph=True)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach()


def lecam_regularizer(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, ema_real: torch.Tensor, ema_fake: torch.Tensor
) -> torch.Tensor:
    """LeCAM: real logits above the moving average of fake ones, and fake logits below the average of real ones,
    are penalised squared (Open-MAGVIT2's `lecam_reg`), which keeps the discriminator from racing away."""
    return F.relu(logits_real - ema_fake).pow(2).mean() + F.relu(ema_real - logits_fake).pow(2).mean()


def entropy_loss(distances: torch.Tensor, temperature: float) -> torch.Tensor:
    """Codebook usage from the squared distances (N, K) of N vectors to the K codes (`quantizers.squared_distances`):
    p = softmax(-distances / temperature) per vector; the mean entropy of each p (low: each vector sure of its
    code) minus the entropy of their mean (high: the batch spread over all codes). LlamaGen's
    `compute_entropy_loss`, with its 1e-5 inside the second logarithm."""
    logits = -distances.float() / temperature  # (N, K); at T = 0.01 half precision would round them away
    probs = logits.softmax(dim=1)  # (N, K)
    sample_entropy = -(probs * logits.log_softmax(dim=1)).sum(dim=1).mean()
    mean_probs = probs.mean(dim=0)  # (K,)
    codebook_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    return sample_entropy - codebook_entropy


# -- the discriminator ---------------------------------------------------------


def _init_weights(module: nn.Module) -> None:
    """taming's `weights_init` (from DCGAN): convolution weights N(0, 0.02), BatchNorm scales N(1, 0.02) and
    shifts 0; convolution biases keep PyTorch's initialisation, as there."""
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, 0.02)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


class NLayerDiscriminator(nn.Module):
    """The PatchGAN discriminator (pix2pix, Isola et al. 2017, section 3.2.2), as taming's and LlamaGen's: images
    (B, C, H, W) -> logits (B, 1, h, w), one per overlapping patch. 4x4 convolutions padded by 1: `layers` of
    them with stride 2, widths filters * (1, 2, 4, 8, 8, ...), then one of stride 1 and one down to a single
    channel; BatchNorm and LeakyReLU(0.2) between (no bias before a BatchNorm). Layer for layer taming's
    `main` Sequential, so their state dicts load into each other and the same seed draws the same weights."""

    def __init__(self, in_channels: int = 3, filters: int = 64, layers: int = 3) -> None:
        super().__init__()
        widths = [filters * min(2**n, 8) for n in range(layers + 1)]
        sequence = [nn.Conv2d(in_channels, widths[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2, True)]
        for n in range(1, layers + 1):
            stride = 2 if n < layers else 1  # the last width keeps the resolution
            sequence += [
                nn.Conv2d(widths[n - 1], widths[n], 4, stride=stride, padding=1, bias=False),
                nn.BatchNorm2d(widths[n]),
                nn.LeakyReLU(0.2, True),
            ]
        sequence.append(nn.Conv2d(widths[-1], 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*sequence)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)  # (B, 1, H / 2**layers - 2, W / 2**layers - 2)


# -- the objective -------------------------------------------------------------


class Objective(nn.Module):
    """The whole training objective as its `ObjectiveConfig` says: the discriminator (None without an adversarial
    term) and LeCAM's moving averages (buffers `ema_real` and `ema_fake`, so checkpoints hold them) are its
    state. The averages move in training mode only, towards the mean logits of every process: each of
    Open-MAGVIT2's processes keeps its own, but a checkpoint holds one copy of the state, from which a resumed
    run could not give each process back its own."""

    def __init__(self, config: ObjectiveConfig, in_channels: int = 3) -> None:
        super().__init__()
        self.config = config
        self.discriminator = (
            NLayerDiscriminator(in_channels, config.disc_filters, config.disc_layers) if config.adversarial else None
        )
        if config.lecam_weight > 0:
            # Open-MAGVIT2's LeCAM_EMA starts both at 0
            self.register_buffer("ema_real", torch.zeros(()))
            self.register_buffer("ema_fake", torch.zeros(()))

    def generator_loss(
        self,
        images: torch.Tensor,
        reconstructions: torch.Tensor,
        quantizer_loss: torch.Tensor,
        distances: torch.Tensor | None,
        last_layer: torch.Tensor | None,
        step: int,
        perceptual: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, dict]:
        """The tokenizer's loss at a training step, and its terms for the logs (detached), all in full precision
        under autocast too.

        images, reconstructions (B, C, H, W) in [-1, 1]; quantizer_loss as the quantizer returns it; distances
        (N, K) squared, when the entropy term is on; last_layer the decoder's last weight, for the adaptive
        weight; perceptual(images, reconstructions) a distance per image (LPIPS), when its weight is not 0.
        Without gradients (an evaluation) the adaptive weight is 0, as taming's is.
        """
        c = self.config
        pixel = pixel_loss(images, reconstructions, c.pixel_loss)
        rec_loss = c.pixel_weight * pixel  # the reconstruction terms, whose gradient the adaptive weight matches
        logs = {"pixel": pixel.detach()}
        if c.perceptual_weight > 0:
            if perceptual is None:
                raise ValueError("perceptual_weight is not 0: pass the perceptual network (LPIPS) as `perceptual`")
            p_loss = perceptual(images, reconstructions).float().mean()
            rec_loss = rec_loss + c.perceptual_weight * p_loss
            logs["perceptual"] = p_loss.detach()
        loss = rec_loss + c.codebook_weight * quantizer_loss
        logs["quantizer"] = quantizer_loss.detach()
        if c.entropy_weight > 0:
            if distances is None:
                raise ValueError("entropy_weight is not 0: pass the quantizer's squared distances as `distances`")
            entropy = entropy_loss(distances, c.entropy_temperature)
            loss = loss + c.entropy_weight * entropy
            logs["entropy"] = entropy.detach()
        if self.discriminator is not None and step >= c.disc_start:
            g_loss = GENERATOR_LOSSES[c.gen_loss](self.discriminator(reconstructions).float())
            d_weight = c.disc_weight
            if c.adaptive_weight:
                if last_layer is None:
                    raise ValueError("adaptive_weight is on: pass the decoder's last layer's weight as `last_layer`")
                ratio = adaptive_weight(rec_loss, g_loss, last_layer) if torch.is_grad_enabled() else 0.0
                d_weight = d_weight * ratio
            loss = loss + d_weight * g_loss
            logs.update(g_loss=g_loss.detach(), d_weight=d_weight)
        logs["loss"] = loss.detach()
        return loss, logs

    def discriminator_loss(
        self, images: torch.Tensor, reconstructions: torch.Tensor, step: int
    ) -> tuple[torch.Tensor, dict]:
        """The discriminator's loss at a training step, on the images and the (detached) reconstructions, both
        (B, C, H, W) in [-1, 1], with LeCAM when on; 0 times itself before disc_start, as taming's."""
        if self.discriminator is None:
            raise ValueError("this objective has no discriminator: disc_weight is 0")
        c = self.config
        # one batch each, as taming's: BatchNorm normalises real and fake apart
        logits_real = self.discriminator(images.detach()).float()  # (B, 1, h, w)
        logits_fake = self.discriminator(reconstructions.detach()).float()
        d_loss = DISCRIMINATOR_LOSSES[c.disc_loss](logits_real, logits_fake)
        logs = {"logits_real": logits_real.detach().mean(), "logits_fake": logits_fake.detach().mean()}
        if c.lecam_weight > 0:
            if self.training:  # the averages first, then the penalty against them (Open-MAGVIT2's order)
                means = torch.stack([logs["logits_real"], logs["logits_fake"]])
                if in_process_group():
                    dist.all_reduce(means)
                    means /= dist.get_world_size()
                self.ema_real.lerp_(means[0], 1 - c.lecam_decay)
                self.ema_fake.lerp_(means[1], 1 - c.lecam_decay)
            lecam = lecam_regularizer(logits_real, logits_fake, self.ema_real, self.ema_fake)
            d_loss = d_loss + c.lecam_weight * lecam
            logs["lecam"] = lecam.detach()
        loss = d_loss if step >= c.disc_start else 0.0 * d_loss
        logs["d_loss"] = loss.detach()
        return loss, logs
