"""The training objective (`vqtok.tokenizers.losses`): each term against the reference it follows, and the whole.

taming-transformers is installed, and its discriminator is imported as it is. Its losses module is run as
published (`taming_losses`) but for its import of LPIPS, which needs torchvision and VGG16 weights that no machine
here has; a fixed random network with LPIPS's call and shape stands in for it, for taming and vqtok alike, so
the tests say how each objective uses a perceptual distance, not what LPIPS's numbers are. LlamaGen's and
Open-MAGVIT2's functions are not installed: the tests transcribe them from their published files
(tokenizer/tokenizer_image/vq_loss.py and vq_model.py; src/Open_MAGVIT2/modules/losses/vqperceptual.py).
"""

import ast
import dataclasses
import importlib.util
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from taming.modules.discriminator.model import NLayerDiscriminator as TamingDiscriminator
from taming.modules.discriminator.model import weights_init
from torch import nn

from vqtok import VQGAN, VQVAE, ModelConfig, QuantizerConfig, VQGANConfig
from vqtok.config import ObjectiveConfig
from vqtok.errors import ConfigError
from vqtok.tokenizers.losses import (
    NLayerDiscriminator,
    Objective,
    adaptive_weight,
    entropy_loss,
    hinge_d_loss,
    hinge_g_loss,
    lecam_regularizer,
    non_saturating_d_loss,
    non_saturating_g_loss,
    pixel_loss,
)
from vqtok.tokenizers.quantizers import nearest_codes, squared_distances

# A tiny VQGAN whose codebook is learned by gradient (no EMA), so every tokenizer weight has a gradient to check.
QUANTIZER = QuantizerConfig(codebook_size=32, code_dim=8, decay=None, kmeans_init=False, dead_code_window=0)
TINY_VQGAN = VQGANConfig(
    base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attn_levels=(), z_channels=16, quantizer=QUANTIZER
)


class StandInPerceptual(nn.Module):
    """LPIPS's call and shape, (B, C, H, W) twice -> (B, 1, 1, 1), and its frozen weights: the squared distance
    between a fixed random convolution's features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        gen = torch.Generator().manual_seed(7)
        with torch.no_grad():
            self.conv.weight.copy_(0.3 * torch.randn(self.conv.weight.shape, generator=gen))
            self.conv.bias.zero_()
        self.requires_grad_(False)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return (self.conv(x) - self.conv(y)).pow(2).mean(dim=(1, 2, 3), keepdim=True)


@pytest.fixture(scope="module")
def taming_losses():
    """taming/modules/losses/vqperceptual.py as installed, all of it but the import of its LPIPS, which
    `StandInPerceptual` replaces."""
    path = Path(importlib.util.find_spec("taming").origin).parent / "modules" / "losses" / "vqperceptual.py"
    tree = ast.parse(path.read_text())
    lpips = [n for n in tree.body if isinstance(n, ast.ImportFrom) and n.module == "taming.modules.losses.lpips"]
    assert len(lpips) == 1  # the one line left out
    tree.body.remove(lpips[0])
    namespace = {"LPIPS": StandInPerceptual}
    exec(compile(tree, str(path), "exec"), namespace)
    return SimpleNamespace(**namespace)


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def tiny_vqgan(seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    return VQGAN(TINY_VQGAN)


def tokenize(model: VQGAN, images: torch.Tensor):
    """What a training step's forward gives the objective: images and reconstructions in [-1, 1], the quantizer's
    loss, and the squared distances of the encoder's vectors to the codes (looked up as they are, unprojected)."""
    x = images * 2 - 1  # (B, 3, H, W)
    z_e = model.encode_latent(x)  # (B, D, h, w)
    z_q, _, quantizer_loss = model.quantizer(z_e)
    flat = z_e.permute(0, 2, 3, 1).reshape(-1, z_e.shape[1])  # (B*h*w, D)
    distances = squared_distances(flat, model.quantizer.table())  # (B*h*w, K)
    return x, model.decode_latent(z_q), quantizer_loss, distances


def grads(loss: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    return torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)


# -- the discriminator ---------------------------------------------------------


@pytest.mark.parametrize("layers", [2, 3])
def test_discriminator_has_tamings_keys_and_outputs_both_ways(layers):
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(layers))
    taming = TamingDiscriminator(input_nc=3, ndf=16, n_layers=layers).apply(weights_init)
    ours = NLayerDiscriminator(3, filters=16, layers=layers)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in taming.state_dict().items()}
    for source, target in ((taming, ours), (ours, taming)):
        source.train()
        source(torch.randn(4, 3, 32, 32))  # running statistics away from their initial values
        target.load_state_dict(source.state_dict())
        for mode in ("train", "eval"):
            source.train(mode == "train")
            target.train(mode == "train")
            assert torch.equal(target(x), source(x)), (source is taming, mode)


def test_the_same_seed_draws_tamings_discriminator():
    torch.manual_seed(3)
    taming = TamingDiscriminator(input_nc=3, ndf=64, n_layers=3).apply(weights_init)
    torch.manual_seed(3)
    ours = NLayerDiscriminator(3, filters=64, layers=3)
    theirs = taming.state_dict()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in ours.state_dict().items())


def test_discriminator_weights_are_drawn_as_tamings_weights_init():
    torch.manual_seed(0)
    model = NLayerDiscriminator(3, filters=64, layers=3)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(convs) == 5 and len(norms) == 3
    conv_weights = torch.cat([m.weight.flatten() for m in convs])  # 2.8M draws
    assert abs(conv_weights.mean()) < 1e-4 and abs(conv_weights.std() - 0.02) < 1e-4
    bn_scales = torch.cat([m.weight for m in norms])  # 896 draws
    assert abs(bn_scales.mean() - 1) < 3e-3 and abs(bn_scales.std() - 0.02) < 3e-3
    assert all(torch.equal(m.bias, torch.zeros_like(m.bias)) for m in norms)
    # convolution biases (first and last layer only) keep PyTorch's uniform(+-1/sqrt(fan_in)), as in taming
    assert [m.bias is not None for m in convs] == [True, False, False, False, True]
    for conv in (convs[0], convs[-1]):
        bound = 1 / math.sqrt(conv.weight[0].numel())
        assert conv.bias.abs().max() <= bound and conv.bias.abs().max() > 0


# -- the adversarial losses ----------------------------------------------------


def test_adversarial_losses_equal_tamings_and_the_formulas(taming_losses):
    gen = torch.Generator().manual_seed(1)
    real, fake = 2 * torch.randn(4, 1, 6, 6, generator=gen), 2 * torch.randn(4, 1, 6, 6, generator=gen)
    assert torch.equal(hinge_d_loss(real, fake), taming_losses.hinge_d_loss(real, fake))
    assert torch.allclose(non_saturating_d_loss(real, fake), taming_losses.vanilla_d_loss(real, fake))
    by_hand = 0.5 * (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean())
    assert torch.allclose(hinge_d_loss(real, fake), by_hand)
    by_hand = -0.5 * (torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean())
    assert torch.allclose(non_saturating_d_loss(real, fake), by_hand)
    assert torch.equal(hinge_g_loss(fake), -fake.mean())  # taming's and LlamaGen's g_loss
    by_hand = -torch.log(torch.sigmoid(fake)).mean()
    assert torch.allclose(non_saturating_g_loss(fake), by_hand)
    assert torch.allclose(non_saturating_g_loss(fake), F.binary_cross_entropy_with_logits(fake, torch.ones_like(fake)))


def test_llamagens_published_non_saturating_generator_loss_is_the_hinge_loss_shifted():
    """LlamaGen's non_saturating_gen_loss passes (ones, logits) to binary_cross_entropy_with_logits, whose
    arguments are (input, target): logits as targets of a constant input 1, which is softplus(1) - mean(logits),
    the hinge loss plus a constant. vqtok's non-saturating loss is the one its name means; LlamaGen's default,
    hinge, is the same in both."""
    fake = 2 * torch.randn(4, 1, 6, 6, generator=torch.Generator().manual_seed(2))
    llamagen = torch.mean(F.binary_cross_entropy_with_logits(torch.ones_like(fake), fake))  # as published
    assert torch.allclose(llamagen, F.softplus(torch.tensor(1.0)) + hinge_g_loss(fake))
    assert not torch.allclose(llamagen, non_saturating_g_loss(fake))


def test_pixel_losses_are_means_over_pixels():
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 8, 8, generator=gen)
    assert torch.allclose(pixel_loss(x, y, "l1"), (x - y).abs().sum() / x.numel())
    assert torch.allclose(pixel_loss(x, y, "l2"), (x - y).pow(2).sum() / x.numel())


# -- the start step and the adaptive weight ------------------------------------


def test_the_discriminator_is_off_before_disc_start(images, taming_losses):
    assert [taming_losses.adopt_weight(1.0, step, threshold=5) for step in (0, 4, 5, 6)] == [0.0, 0.0, 1.0, 1.0]
    config = ObjectiveConfig(disc_weight=0.5, disc_start=5, adaptive_weight=False)
    objective, plain = Objective(config), Objective(ObjectiveConfig())
    model = tiny_vqgan()
    x, x_rec, quantizer_loss, distances = tokenize(model, images)
    last = model.decoder.conv_out.weight
    before, logs = objective.generator_loss(x, x_rec, quantizer_loss, distances, last, 4)
    assert torch.equal(before, plain.generator_loss(x, x_rec, quantizer_loss, distances, last, 4)[0])
    assert "g_loss" not in logs
    at, logs = objective.generator_loss(x, x_rec, quantizer_loss, distances, last, 5)
    assert torch.allclose(at, before + 0.5 * logs["g_loss"])

    disc_params = list(objective.discriminator.parameters())
    d_before, _ = objective.discriminator_loss(x, x_rec, 4)
    assert d_before.item() == 0 and all(g.abs().max() == 0 for g in grads(d_before, disc_params))
    d_at, logs = objective.discriminator_loss(x, x_rec, 5)
    assert d_at.item() > 0 and all(g.abs().max() > 0 for g in grads(d_at, disc_params))


def test_adaptive_weight_is_the_gradient_norm_ratio_at_the_last_layer(taming_losses):
    gen = torch.Generator().manual_seed(4)
    hidden = nn.Conv2d(3, 8, 3, padding=1)  # a two-layer decoder
    last = nn.Conv2d(8, 3, 3, padding=1)
    disc = NLayerDiscriminator(3, filters=8, layers=2)
    x = torch.randn(2, 3, 16, 16, generator=gen)
    x_rec = last(F.silu(hidden(torch.randn(2, 3, 16, 16, generator=gen))))
    rec_loss = (x_rec - x).abs().mean()
    g_loss = -disc(x_rec).mean()

    rec_grad = torch.autograd.grad(rec_loss, last.weight, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last.weight, retain_graph=True)[0]
    by_hand = rec_grad.pow(2).sum().sqrt() / (g_grad.pow(2).sum().sqrt() + 1e-4)
    weight = adaptive_weight(rec_loss, g_loss, last.weight)
    assert torch.allclose(weight, by_hand) and not weight.requires_grad
    tamings = taming_losses.VQLPIPSWithDiscriminator.calculate_adaptive_weight
    assert torch.allclose(weight, tamings(SimpleNamespace(discriminator_weight=1.0), rec_loss, g_loss, last.weight))
    # clamped to 1e4 where the adversarial gradient all but vanishes
    assert adaptive_weight(1e6 * rec_loss, 1e-12 * g_loss, last.weight).item() == 1e4
    (rec_loss + weight * g_loss).backward()  # the graph is kept for the step's backward
    assert hidden.weight.grad is not None


# -- LeCAM and the entropy loss --------------------------------------------------


class OpenMagvit2LeCAM:
    """Open-MAGVIT2's LeCAM_EMA and lecam_reg, transcribed from its vqperceptual.py."""

    def __init__(self, init=0.0, decay=0.999):
        self.logits_real_ema = init
        self.logits_fake_ema = init
        self.decay = decay

    def update(self, logits_real, logits_fake):
        self.logits_real_ema = self.logits_real_ema * self.decay + torch.mean(logits_real).item() * (1 - self.decay)
        self.logits_fake_ema = self.logits_fake_ema * self.decay + torch.mean(logits_fake).item() * (1 - self.decay)

    def reg(self, real_pred, fake_pred):
        return torch.mean(F.relu(real_pred - self.logits_fake_ema).pow(2)) + torch.mean(
            F.relu(self.logits_real_ema - fake_pred).pow(2)
        )


def test_lecam_follows_open_magvit2_step_by_step(images):
    decay = 0.9  # moves the averages far enough in three steps to tell an off-by-one step apart
    objective = Objective(ObjectiveConfig(disc_weight=0.1, adaptive_weight=False, lecam_weight=0.05, lecam_decay=decay))
    assert {"ema_real", "ema_fake"} <= set(objective.state_dict())  # checkpointed with the discriminator
    reference = OpenMagvit2LeCAM(decay=decay)
    reference_disc = NLayerDiscriminator(3, filters=64, layers=3)
    reference_disc.load_state_dict(objective.discriminator.state_dict())
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        x = images * 2 - 1
        x_rec = x + 0.3 * step * torch.randn(x.shape, generator=gen)
        loss, logs = objective.discriminator_loss(x, x_rec, step)
        logits_real, logits_fake = reference_disc(x), reference_disc(x_rec)
        reference.update(logits_real, logits_fake)  # Open-MAGVIT2 updates, then regularises
        lecam = reference.reg(logits_real, logits_fake)
        assert math.isclose(objective.ema_real.item(), reference.logits_real_ema, rel_tol=1e-5)
        assert math.isclose(objective.ema_fake.item(), reference.logits_fake_ema, rel_tol=1e-5)
        assert torch.allclose(logs["lecam"], lecam, rtol=1e-5)
        assert torch.allclose(loss, hinge_d_loss(logits_real, logits_fake) + 0.05 * lecam, rtol=1e-5)
    by_hand = F.relu(logits_real - reference.logits_fake_ema).pow(2).mean()
    by_hand += F.relu(reference.logits_real_ema - logits_fake).pow(2).mean()
    assert torch.allclose(lecam_regularizer(logits_real, logits_fake, objective.ema_real, objective.ema_fake), by_hand)

    objective.eval()  # an evaluation leaves the averages where training put them
    frozen = objective.ema_real.clone(), objective.ema_fake.clone()
    objective.discriminator_loss(x, x_rec, 3)
    assert torch.equal(objective.ema_real, frozen[0]) and torch.equal(objective.ema_fake, frozen[1])


def llamagen_entropy_loss(affinity, temperature=0.01):
    """LlamaGen's compute_entropy_loss (vq_model.py) for its one loss_type, softmax, without its in-place division."""
    flat_affinity = affinity.reshape(-1, affinity.shape[-1]) / temperature
    probs = F.softmax(flat_affinity, dim=-1)
    log_probs = F.log_softmax(flat_affinity + 1e-5, dim=-1)
    avg_probs = torch.mean(probs, dim=0)
    avg_entropy = -torch.sum(avg_probs * torch.log(avg_probs + 1e-5))
    sample_entropy = -torch.mean(torch.sum(probs * log_probs, dim=-1))
    return sample_entropy - avg_entropy


def test_entropy_loss_is_llamagens():
    gen = torch.Generator().manual_seed(6)
    flat, codebook = torch.randn(300, 8, generator=gen), torch.randn(64, 8, generator=gen)
    distances = squared_distances(flat, codebook)
    for temperature in (0.01, 1.0, 10.0):
        ours = entropy_loss(distances, temperature)
        assert torch.allclose(ours, llamagen_entropy_loss(-distances, temperature), atol=1e-5), temperature


def test_entropy_loss_at_its_extremes():
    K = 16
    log_k = math.log(K)
    # every vector as far from every code: each p uniform, and so their mean: log K - log K
    assert abs(entropy_loss(torch.ones(40, K), 0.01).item()) < 1e-3
    # each vector sure of its own code, the batch over all K: 0 - log K, the least the loss can be
    sharp = 100 * (1 - torch.eye(K))  # (K, K): distance 0 to its code, 100 to the others
    assert math.isclose(entropy_loss(sharp, 0.01).item(), -log_k, abs_tol=1e-3)
    # each vector sure, all of the same code: 0 - 0
    one_code = sharp[:1].expand(40, K)
    assert abs(entropy_loss(one_code, 0.01).item()) < 1e-3


def test_squared_distances_are_the_lookups_with_gradients():
    gen = torch.Generator().manual_seed(8)
    flat = torch.randn(500, 8, generator=gen, requires_grad=True)
    codebook = torch.randn(128, 8, generator=gen)
    distances = squared_distances(flat, codebook)  # (N, K)
    assert distances.shape == (500, 128)
    assert torch.allclose(distances, torch.cdist(flat, codebook).pow(2), atol=1e-4)
    assert torch.equal(distances.argmin(dim=1), nearest_codes(flat, codebook))
    distances.sum().backward()
    assert torch.allclose(flat.grad, 2 * (128 * flat - codebook.sum(0)), atol=1e-3)


# -- the objective ---------------------------------------------------------------


@pytest.mark.parametrize("family", ["vqvae", "vqgan"])
def test_the_default_objective_is_vqtoks_present_loss(images, family):
    torch.manual_seed(0)
    model = VQVAE(ModelConfig(hidden_channels=32, quantizer=QUANTIZER)) if family == "vqvae" else VQGAN(TINY_VQGAN)
    out = model(images)  # training mode: its quantizer's statistics move once
    objective = Objective(ObjectiveConfig())
    assert objective.discriminator is None and not list(objective.parameters()) and not list(objective.buffers())
    loss, logs = objective.generator_loss(images * 2 - 1, out.recon * 2 - 1, out.vq_loss, None, None, step=0)
    assert torch.allclose(loss, out.loss) and torch.allclose(logs["pixel"], out.recon_loss)
    params = [p for p in model.parameters() if p.requires_grad]
    for ours, theirs in zip(grads(loss, params), grads(out.loss, params), strict=True):
        assert torch.allclose(ours, theirs, atol=1e-6)


@pytest.mark.parametrize("disc_start", [3, 2])  # before the discriminator plays, and once it does
def test_taming_settings_give_tamings_vqlpips_with_discriminator(images, taming_losses, disc_start):
    taming = taming_losses.VQLPIPSWithDiscriminator(
        disc_start=disc_start, disc_num_layers=2, disc_weight=0.8, perceptual_weight=1.0, codebook_weight=1.0
    )
    config = ObjectiveConfig(
        pixel_loss="l1", perceptual_weight=1.0, disc_weight=0.8, disc_start=disc_start, disc_layers=2
    )
    assert config.adaptive_weight and config.disc_loss == config.gen_loss == "hinge" and config.codebook_weight == 1
    objective = Objective(config)
    objective.discriminator.load_state_dict(taming.discriminator.state_dict())
    model = tiny_vqgan()
    x, x_rec, quantizer_loss, _ = tokenize(model, images)
    last = model.decoder.conv_out.weight
    step = 2

    theirs, their_logs = taming(quantizer_loss, x, x_rec, 0, step, last_layer=last)
    ours, logs = objective.generator_loss(x, x_rec, quantizer_loss, None, last, step, taming.perceptual_loss)
    assert torch.allclose(ours, theirs)
    if step >= disc_start:
        # to rounding: a CPU convolution's last bits differ from one call to the next after another one ran
        assert torch.allclose(logs["d_weight"], their_logs["train/d_weight"], atol=1e-6)
        assert torch.allclose(logs["g_loss"], their_logs["train/g_loss"], atol=1e-6)
    params = list(model.parameters())
    for mine, tamings in zip(grads(ours, params), grads(theirs, params), strict=True):
        assert torch.allclose(mine, tamings, rtol=1e-4, atol=1e-6)

    theirs, _ = taming(quantizer_loss, x, x_rec, 1, step)
    ours, _ = objective.discriminator_loss(x, x_rec, step)
    assert torch.allclose(ours, theirs)
    if step >= disc_start:
        for mine, tamings in zip(
            grads(ours, list(objective.discriminator.parameters())),
            grads(theirs, list(taming.discriminator.parameters())),
            strict=True,
        ):
            assert torch.allclose(mine, tamings, rtol=1e-4, atol=1e-6)


def test_llamagen_settings_give_llamagens_vqloss(images):
    """LlamaGen's VQLoss.forward, transcribed: rec_weight * mse + perceptual_weight * p + disc_weight * hinge g_loss
    + its quantizer's (vq_loss + commit_loss + entropy_loss_ratio * compute_entropy_loss(-d)); its discriminator's
    loss is disc_weight * hinge_d_loss, where taming's (and vqtok's) is not scaled by disc_weight."""
    config = ObjectiveConfig(
        pixel_loss="l2", perceptual_weight=1.0, disc_weight=0.5, disc_start=0, adaptive_weight=False, entropy_weight=0.1
    )
    objective, perceptual = Objective(config), StandInPerceptual()
    model = tiny_vqgan()
    x, x_rec, quantizer_loss, distances = tokenize(model, images)
    ours, _ = objective.generator_loss(x, x_rec, quantizer_loss, distances, None, 0, perceptual)
    disc = objective.discriminator
    llamagen = (
        1.0 * F.mse_loss(x, x_rec)
        + 1.0 * torch.mean(perceptual(x, x_rec))
        + 1 * 0.5 * -torch.mean(disc(x_rec))
        + quantizer_loss
        + 0.1 * llamagen_entropy_loss(-distances)
    )
    assert torch.allclose(ours, llamagen)
    d_loss, _ = objective.discriminator_loss(x, x_rec, 0)
    real, fake = disc(x.detach()), disc(x_rec.detach())
    llamagen = 0.5 * (0.5 * (torch.mean(F.relu(1.0 - real)) + torch.mean(F.relu(1.0 + fake))))
    assert torch.allclose(0.5 * d_loss, llamagen)


def test_every_term_gives_finite_losses_and_gradients_to_every_weight(images):
    config = ObjectiveConfig(
        pixel_loss="l1",
        perceptual_weight=1.0,
        disc_weight=0.8,
        disc_layers=2,
        disc_filters=16,
        gen_loss="non-saturating",
        disc_loss="non-saturating",
        lecam_weight=0.05,
        entropy_weight=0.1,
    )
    objective, model = Objective(config), tiny_vqgan()
    x, x_rec, quantizer_loss, distances = tokenize(model, images)
    last = model.decoder.conv_out.weight
    loss, logs = objective.generator_loss(x, x_rec, quantizer_loss, distances, last, 0, StandInPerceptual())
    assert set(logs) == {"pixel", "perceptual", "quantizer", "entropy", "g_loss", "d_weight", "loss"}
    assert all(torch.isfinite(torch.as_tensor(value)) for value in logs.values())
    generator = [p for p in model.parameters() if p.requires_grad]
    for (name, _), grad in zip(model.named_parameters(), grads(loss, generator), strict=True):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name

    d_loss, d_logs = objective.discriminator_loss(x, x_rec, 0)
    assert set(d_logs) == {"logits_real", "logits_fake", "lecam", "d_loss"}
    assert torch.isfinite(d_loss)
    for (name, _), grad in zip(
        objective.discriminator.named_parameters(),
        grads(d_loss, list(objective.discriminator.parameters())),
        strict=True,
    ):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name
    # the discriminator's loss sees reconstructions detached: no gradient reaches the tokenizer
    assert all(g is None for g in grads(d_loss, generator))


def test_under_bf16_autocast_the_losses_are_kept_in_full_precision(images):
    config = ObjectiveConfig(perceptual_weight=1.0, disc_weight=0.8, disc_layers=2, disc_filters=16, lecam_weight=0.05)
    objective, model = Objective(config), tiny_vqgan()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x, x_rec, quantizer_loss, _ = tokenize(model, images)
        assert x_rec.dtype == torch.bfloat16
        last = model.decoder.conv_out.weight
        loss, logs = objective.generator_loss(x, x_rec, quantizer_loss, None, last, 0, StandInPerceptual())
        d_loss, d_logs = objective.discriminator_loss(x, x_rec, 0)
    for value in (loss, d_loss, *logs.values(), *d_logs.values(), objective.ema_real):
        assert value.dtype == torch.float32 and torch.isfinite(value)


def test_without_gradients_the_adaptive_weight_is_zero_as_tamings(images):
    objective, model = Objective(ObjectiveConfig(disc_weight=0.8)), tiny_vqgan()
    with torch.no_grad():
        x, x_rec, quantizer_loss, _ = tokenize(model, images)
        loss, logs = objective.generator_loss(x, x_rec, quantizer_loss, None, model.decoder.conv_out.weight, 0)
    assert logs["d_weight"] == 0 and torch.allclose(loss, logs["pixel"] + quantizer_loss)


def test_missing_inputs_are_refused(images):
    model = tiny_vqgan()
    x, x_rec, quantizer_loss, _ = tokenize(model, images)
    with pytest.raises(ValueError, match="perceptual"):
        Objective(ObjectiveConfig(perceptual_weight=1.0)).generator_loss(x, x_rec, quantizer_loss, None, None, 0)
    with pytest.raises(ValueError, match="distances"):
        Objective(ObjectiveConfig(entropy_weight=0.1)).generator_loss(x, x_rec, quantizer_loss, None, None, 0)
    with pytest.raises(ValueError, match="last_layer"):
        Objective(ObjectiveConfig(disc_weight=0.1)).generator_loss(x, x_rec, quantizer_loss, None, None, 0)
    with pytest.raises(ValueError, match="no discriminator"):
        Objective(ObjectiveConfig()).discriminator_loss(x, x_rec, 0)


# -- the settings ------------------------------------------------------------------


def test_default_settings_are_vqtoks_plain_objective():
    config = ObjectiveConfig()
    assert (config.pixel_loss, config.pixel_weight, config.codebook_weight) == ("l2", 1.0, 1.0)
    assert config.perceptual_weight == config.disc_weight == config.entropy_weight == config.lecam_weight == 0
    assert not config.adversarial
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.disc_weight = 1.0


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"pixel_loss": "l3"}, "pixel_loss must be l1 or l2"),
        ({"disc_loss": "vanilla"}, "disc_loss must be hinge or non-saturating"),
        ({"gen_loss": "wasserstein"}, "gen_loss must be hinge or non-saturating"),
        ({"perceptual_weight": -1.0}, "perceptual_weight must be a number >= 0"),
        ({"disc_weight": float("nan")}, "disc_weight must be a number >= 0"),
        ({"entropy_weight": float("inf")}, "entropy_weight must be a number >= 0"),
        ({"codebook_weight": True}, "codebook_weight must be a number >= 0"),
        ({"pixel_weight": "1"}, "pixel_weight must be a number >= 0"),
        ({"disc_layers": 0}, "disc_layers must be a positive integer"),
        ({"disc_filters": 1.5}, "disc_filters must be a positive integer"),
        ({"disc_start": -1}, "disc_start must be a non-negative integer"),
        ({"adaptive_weight": 1}, "adaptive_weight must be true or false"),
        ({"disc_weight": 0.1, "lecam_decay": 1.0}, r"lecam_decay must be in \(0, 1\)"),
        ({"entropy_temperature": 0.0}, "entropy_temperature must be positive"),
        ({"pixel_weight": 0.0}, "nothing would ask for reconstructions"),
        ({"lecam_weight": 0.05}, "disc_weight 0 has none"),
    ],
)
def test_nonsensical_settings_are_refused_in_one_line(settings, message):
    with pytest.raises(ConfigError, match=message) as error:
        ObjectiveConfig(**settings)
    assert "\n" not in str(error.value)
