"""vqtok fit with the VQGAN objective: a recipe's [objective] and the options over it, LPIPS's weights files, the
discriminator with its optimizer, the EMA of the weights, and runs killed and resumed that end with the weights
of the uninterrupted run, bit for bit, on one process and on two."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import torch
from click.testing import CliRunner
from conftest import (
    image_samples,
    kill_after_checkpoint,
    llamagen_vq,
    read_metrics,
    taming_discriminator,
    two_processes,
    write_recipe,
)
from safetensors.torch import load_file

from vqtok import load_tokenizer
from vqtok.cli import cli
from vqtok.config import ObjectiveConfig, TrainConfig, VQGANConfig, load_config, load_objective_config
from vqtok.data import make_loader
from vqtok.evaluate import evaluate
from vqtok.pretrained import weights_hash
from vqtok.runs import lr_lambda
from vqtok.tokenizers import build_tokenizer
from vqtok.tokenizers.discriminator_file import read_discriminator, save_discriminator

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

PIPELINES = Path(__file__).resolve().parent.parent / "pipelines"
SMALL_GAN = PIPELINES / "vqgan-cpu-small-gan.toml"
# A VQGAN small enough for tests: 16 px crops -> 8x8 codes, one block per level, no attention.
TINY_VQGAN = {
    "family": "vqgan",
    "image_size": 16,
    "base_channels": 32,
    "channel_mult": [1, 1],
    "num_res_blocks": 1,
    "attn_levels": [],
    "mid_attention": False,
    "z_channels": 32,
    "codebook_size": 16,
    "code_dim": 8,
    # a restart check every 3 steps, of codes used less than 0.9 of an even share over 24 steps: restarts happen in
    # the run's last steps, at steps a resumed run must keep
    "dead_code_window": 24,
    "rare_code_share": 0.9,
}


@pytest.fixture
def shards(make_shard):
    train = [make_shard(f"t{i}.tar", image_samples([f"t{i}-{j}" for j in range(12)], seed=i)) for i in range(2)]
    return train, make_shard("val.tar", image_samples([f"v{j}" for j in range(4)], seed=100))


def gan_recipe(tmp_path: Path, **train) -> Path:
    """The tiny network with the small GAN recipe's [objective] (LPIPS, the PatchGAN with the adaptive weight),
    shrunk to 16 px, and the rest of the objective on: the entropy loss, LeCAM, the EMA."""
    objective = tomllib.loads(SMALL_GAN.read_text())["objective"]
    objective.update(disc_layers=1, disc_filters=8, entropy_weight=0.1, lecam_weight=0.05)
    settings = {"batch_size": 4, "lr": 1e-3, "beta1": 0.5, "beta2": 0.9, "grad_clip": 1.0, "ema_decay": 0.9}
    tables = {"model": TINY_VQGAN, "objective": objective, "train": {**settings, "log_every": 1, **train}}
    return write_recipe(tmp_path / "gan.toml", tables)


def weights_options(lpips_files) -> list[str]:
    vgg16, linear = lpips_files
    return ["--vgg16-weights", str(vgg16), "--lpips-weights", str(linear)]


def state_tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "state.safetensors"))


def assert_same_tensors(ours: dict, theirs: dict) -> None:
    assert ours.keys() == theirs.keys()
    differ = [name for name in ours if not torch.equal(ours[name], theirs[name])]
    assert not differ, f"{len(differ)} of {len(ours)} tensors differ: {differ[:5]}"


# ------------------------------------------------------------------------------------------- exact resume


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_gan_run_resumed_exactly_ends_with_the_uninterrupted_runs_weights(
    processes, shards, lpips_files, tmp_path
):
    train, val = shards
    recipe = gan_recipe(tmp_path)
    steps = 30

    def command(out: Path) -> list[str]:
        args = ["fit", *train, "--out", out, "--config", recipe, "--steps", steps, "--disc-start", "4"]
        # checkpoints at steps 10 and 20, which the dead-code checks' 3 steps do not divide
        args += ["--save-every", "10", "--val", val, "--eval-every", "5", *weights_options(lpips_files)]
        args += ["--num-workers", "1" if processes == 1 else "0"]
        return two_processes(*args) if processes == 2 else [sys.executable, "-m", "vqtok", *map(str, args)]

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(command(whole), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    killed_at = kill_after_checkpoint(command(killed), killed, 10)
    assert 10 <= killed_at < steps
    resumed = subprocess.run([*command(killed), "--resume", "--exact-resume"], capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    # every state the checkpoint holds, and the exported model, as the uninterrupted run's
    final = f"step-{steps:06d}"
    expected = state_tensors(whole / "checkpoints" / final)
    assert {name.split("/")[0] for name in expected} == {"model", "optimizer", "objective", "disc_optimizer", "ema"}
    assert_same_tensors(state_tensors(killed / "checkpoints" / final), expected)
    assert_same_tensors(
        load_file(str(killed / "model" / "model.safetensors")), load_file(str(whole / "model" / "model.safetensors"))
    )
    # the exported model is the moving average, and holds neither LPIPS nor the discriminator
    exported = load_file(str(whole / "model" / "model.safetensors"))
    assert all(torch.equal(tensor, expected[f"ema/model/{name}"]) for name, tensor in exported.items())
    assert any(not torch.equal(tensor, expected[f"model/{name}"]) for name, tensor in exported.items())
    assert not [name for name in expected if "vgg" in name or "lins" in name]
    assert expected["model/quantizer.fresh_since"].max() > 0  # codes were restarted, at steps the resume kept

    # evaluations measured the moving average: the last one is the exported model's, not the trained weights'
    trained = build_tokenizer(load_config(recipe, model_class=VQGANConfig)[0])
    trained.load_state_dict({name[len("model/") :]: t for name, t in expected.items() if name.startswith("model/")})
    held_out = make_loader([val], 16, 4, num_workers=0)
    last_val = [m for m in read_metrics(whole) if m["split"] == "val"][-1]
    assert evaluate(load_tokenizer(whole / "model"), held_out).metrics()["psnr"] == pytest.approx(last_val["psnr"])
    assert evaluate(trained, held_out).metrics()["psnr"] != pytest.approx(last_val["psnr"])

    metrics = read_metrics(killed)
    replays = [m for m in metrics if "replayed_batches" in m]
    assert [(m["step"], m["replayed_batches"]) for m in replays] == [(killed_at, killed_at)]
    assert replays[0]["replay_seconds"] > 0
    train_logs = [m for m in read_metrics(whole) if m["split"] == "train" and "loss" in m]
    assert [m["step"] for m in train_logs] == list(range(1, steps + 1))
    for entry in train_logs:
        terms = ["loss", "recon_loss", "vq_loss", "perceptual", "entropy", "logits_real", "logits_fake", "lecam"]
        terms += ["d_loss"] + (["g_loss", "d_weight"] if entry["step"] > 4 else [])  # from disc_start on
        assert all(math.isfinite(entry[name]) for name in terms), entry
        assert ("g_loss" in entry) == (entry["step"] > 4)
    assert [m["step"] for m in read_metrics(whole) if m["split"] == "val"] == [5, 10, 15, 20, 25, 30]
    final_record = read_metrics(killed)[-1]
    assert final_record["processes"] == processes and len(set(final_record["codebook_digests"])) == 1


# ------------------------------------------------------------------------------------ the default, as before


def test_the_default_objective_trains_as_vqtok_always_did(shards, tmp_path):
    """A plain fit is the loop vqtok ran before the objective existed, bit for bit: the model, Adam on its
    parameters at the schedule, and one backward of the forward's own loss (pixel MSE + quantizer) per batch."""
    from accelerate.utils import set_seed
    from torch.optim.lr_scheduler import LambdaLR

    from vqtok.config import ModelConfig, QuantizerConfig
    from vqtok.data import expand_inputs
    from vqtok.train import fit

    train, _ = shards
    model_config = ModelConfig(
        hidden_channels=16, image_size=16, quantizer=QuantizerConfig(codebook_size=16, code_dim=8)
    )
    train_config = TrainConfig(steps=4, batch_size=4, num_workers=0, log_every=1)
    fit(train, tmp_path / "run", model_config, train_config, show_progress=False)

    set_seed(0)
    loader = make_loader(expand_inputs(train).units, 16, 4, train=True, resample=True, num_workers=0, seed=0)
    model = build_tokenizer(model_config).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=train_config.lr)
    scheduler = LambdaLR(optimizer, lr_lambda(train_config))
    model.train()
    losses = []
    for batch, _ in zip(loader, range(4), strict=False):
        images = batch.images.float().div_(255).contiguous(memory_format=torch.channels_last)
        output = model(images)
        output.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        losses.append((output.loss.item(), output.recon_loss.item(), output.vq_loss.item()))

    assert_same_tensors(load_file(str(tmp_path / "run" / "model" / "model.safetensors")), model.state_dict())
    logged = [m for m in read_metrics(tmp_path / "run") if "loss" in m]
    assert [(m["loss"], m["recon_loss"], m["vq_loss"]) for m in logged] == losses
    expected_keys = {"loss", "recon_loss", "vq_loss", "lr", "images_per_second", "data_wait", "usage", "perplexity"}
    assert all(set(m) == {"split", "step", *expected_keys} for m in logged)  # today's keys, and no others
    recorded = json.loads((tmp_path / "run" / "run.json").read_text())
    assert (recorded["objective"], recorded["ema_decay"]) == (ObjectiveConfig().to_dict(), None)


# ------------------------------------------------------------------------------ settings, options, refusals


def test_a_recipes_objective_and_the_options_over_it_make_the_run(shards, lpips_files, tmp_path):
    train, _ = shards
    recipe = write_recipe(
        tmp_path / "r.toml",
        {
            "model": {"hidden_channels": 16, "image_size": 16, "codebook_size": 16, "code_dim": 8},
            "objective": {"disc_weight": 0.2, "disc_start": 100, "perceptual_weight": 0.5, "disc_layers": 2},
            "train": {"batch_size": 4, "log_every": 1, "save_every": 3},
        },
    )
    out = tmp_path / "run"
    args = ["fit", *train, "--out", str(out), "--config", str(recipe), "--num-workers", "0", "--steps", "3"]
    options = ["--disc-weight", "0.3", "--disc-start", "1", "--pixel-loss", "l1", "--entropy-weight", "0.05"]
    result = CliRunner().invoke(cli, [*args, *options, *weights_options(lpips_files)])
    assert result.exit_code == 0, result.output

    objective = json.loads((out / "run.json").read_text())["objective"]
    assert (
        objective
        == ObjectiveConfig(
            pixel_loss="l1", perceptual_weight=0.5, disc_weight=0.3, disc_start=1, disc_layers=2, entropy_weight=0.05
        ).to_dict()
    )
    logged = [m for m in read_metrics(out) if "loss" in m]
    # l1: the pixel term is logged beside the pixel MSE; the VQ-VAE's adaptive weight at its last transposed conv
    assert all({"pixel", "perceptual", "entropy", "d_loss", "logits_real"} <= set(m) for m in logged)
    assert [("g_loss" in m, "d_weight" in m) for m in logged] == [(False, False), (True, True), (True, True)]
    assert all(m["d_weight"] != 0.3 and m["pixel"] != m["recon_loss"] for m in logged[1:])
    bar = next(line for line in result.output.splitlines() if line.startswith("fit "))  # 80 columns leave room
    assert re.search(r"recon \S+  lpips \S+  g \S+  d \S+  usage \d+%  \d+ img/s", bar), bar

    weights = weights_options(lpips_files)
    refused = CliRunner().invoke(cli, [*args, *options, *weights, "--disc-weight", "0.4", "--resume", "--steps", "4"])
    assert refused.exit_code == 1
    assert refused.output.strip().splitlines()[-1].endswith("objective.disc_weight changed")


def test_a_run_recorded_before_the_objective_resumes_with_the_default(shards, tmp_path):
    train, _ = shards
    out = tmp_path / "run"
    args = ["fit", *train, "--out", str(out), "--hidden", "8", "--codebook-size", "8", "--code-dim", "4"]
    args += ["--image-size", "16", "--batch-size", "4", "--num-workers", "0", "--save-every", "2"]
    assert CliRunner().invoke(cli, [*args, "--steps", "2"]).exit_code == 0
    recorded = json.loads((out / "run.json").read_text())
    del recorded["objective"], recorded["ema_decay"]  # as vqtok wrote it before them
    (out / "run.json").write_text(json.dumps(recorded))

    resumed = CliRunner().invoke(cli, [*args, "--steps", "4", "--resume"])
    assert resumed.exit_code == 0, resumed.output
    assert [m["step"] for m in read_metrics(out) if "resumed_from" in m] == [0, 2]
    with_ema = write_recipe(tmp_path / "ema.toml", {"train": {"ema_decay": 0.9}})
    refused = CliRunner().invoke(cli, [*args, "--steps", "6", "--resume", "--config", str(with_ema)])
    assert refused.exit_code == 1 and refused.output.strip().endswith("ema_decay changed")


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--perceptual-weight", "1"], "no torchvision's VGG16 weights: put vgg16-397923af.pth in"),
        (
            ["--init", "MODEL", "--train", "decoder", "--entropy-weight", "0.1"],
            "--train decoder freezes the encoder and the codebook, which the entropy loss trains",
        ),
        (["--exact-resume"], "--exact-resume says how to resume: pass --resume with it"),
        (["--config", "objective-typo"], "[objective]: unknown setting(s) disc_wieght; known:"),
        (["--disc-weight", "0", "--config", "lecam"], "lecam_weight regularises the discriminator"),
        (["--disc-weight", "0.5"], "disc_layers 3 make a PatchGAN for crops of 24 px or more, not 16"),
    ],
    ids=["no-lpips", "decoder-entropy", "exact-without-resume", "unknown-setting", "lecam-no-disc", "deep-disc"],
)
def test_fit_refuses_an_objective_it_cannot_train_in_one_line_before_anything(
    extra, message, shards, model_dir, tmp_path
):
    train, _ = shards
    (tmp_path / "objective-typo").write_text("[objective]\ndisc_wieght = 0.5\n")
    (tmp_path / "lecam").write_text("[objective]\ndisc_weight = 0.1\nlecam_weight = 0.05\n")
    extra = [
        model_dir if arg == "MODEL" else str(tmp_path / arg) if arg in ("objective-typo", "lecam") else arg
        for arg in extra
    ]
    out = tmp_path / "run"
    result = CliRunner().invoke(cli, ["fit", *train, "--out", str(out), "--image-size", "16", *extra])
    assert result.exit_code == 1, result.output
    assert result.output.strip().startswith("Error: ") and len(result.output.strip().splitlines()) == 1
    assert message in result.output
    assert not out.exists()  # refused before the run folder was made


def test_a_prior_recipe_has_no_objective(tmp_path):
    from vqtok.config import PriorConfig, PriorTrainConfig
    from vqtok.errors import ConfigError

    recipe = write_recipe(tmp_path / "p.toml", {"model": {"layers": 1}, "objective": {"disc_weight": 0.5}})
    with pytest.raises(
        ConfigError, match=r"\[objective\] is what a tokenizer is trained to minimise; a prior has none"
    ):
        load_config(recipe, model_class=PriorConfig, train_class=PriorTrainConfig)
    with pytest.raises(ConfigError, match="vqtok prior fit keeps no moving average of the weights"):
        PriorTrainConfig(ema_decay=0.999)


def test_fit_help_shows_the_objectives_defaults():
    shown = " ".join(CliRunner().invoke(cli, ["fit", "--help"], terminal_width=200).output.split())
    defaults = ObjectiveConfig()
    for flag, default in [
        ("--pixel-loss", defaults.pixel_loss),
        ("--perceptual-weight", defaults.perceptual_weight),
        ("--disc-weight", defaults.disc_weight),
        ("--disc-start", defaults.disc_start),
        ("--entropy-weight", defaults.entropy_weight),
        ("--adaptive-weight", defaults.adaptive_weight),
    ]:
        assert re.search(rf"{flag} .{{0,300}}?\[default: \({default} or the config file's\)", shown), flag


# ------------------------------------------------------------------------------- the pieces the loop uses


@pytest.mark.parametrize("family", ["vqvae", "vqgan"])
def test_the_forward_gives_the_decoder_output_and_the_distances_the_lookup_minimises(family):
    from vqtok.config import ModelConfig, QuantizerConfig

    torch.manual_seed(0)
    quantizer = QuantizerConfig(codebook_size=16, code_dim=8, decay=None, kmeans_init=False, lookup_dim=4)
    if family == "vqvae":
        model = build_tokenizer(ModelConfig(hidden_channels=16, image_size=16, quantizer=quantizer))
        assert model.last_layer() is model.decoder.up[-1].weight and model.last_layer().shape[1] == 3
    else:
        model = build_tokenizer(
            VQGANConfig(base_channels=32, channel_mult=(1, 1), attn_levels=(), image_size=16, quantizer=quantizer)
        )
        assert model.last_layer() is model.decoder.conv_out.weight and model.last_layer().shape[0] == 3
    images = torch.rand(2, 3, 16, 16)
    output = model(images, distances=True)
    assert torch.allclose(output.decoded, output.recon * 2 - 1, atol=1e-6)  # in [-1, 1], where losses compare
    h, w = output.codes.shape[1:]
    assert output.distances.shape == (2 * h * w, 16)
    assert torch.equal(output.distances.argmin(dim=1), output.codes.flatten())  # the lookup's own distances
    output.distances.sum().backward()  # which train the encoder and the codebook
    assert model.quantizer.codebook.grad.abs().sum() > 0
    assert next(iter(getattr(model, model.ENCODER_MODULES[0]).parameters())).grad.abs().sum() > 0
    assert model(images).distances is None

    model.freeze_encode_side()
    with pytest.raises(ValueError, match="the encode side is frozen"):
        model(images, distances=True)


def test_dead_code_checks_go_on_from_the_quantizers_step():
    """A quantizer checks for dead codes every dead_code_window // 8 steps: one restored at step 10 (a resumed
    run, a fine-tune) checks at steps 12 and 15, as the quantizer it was saved from would, not at 13 and 16."""
    from vqtok.config import QuantizerConfig
    from vqtok.tokenizers.quantizers import VectorQuantizer

    config = QuantizerConfig(codebook_size=8, code_dim=4, dead_code_window=24, kmeans_init=False)
    torch.manual_seed(0)
    trained = VectorQuantizer(config)
    for _ in range(10):
        trained(torch.randn(2, 4, 3, 3))
    restored = VectorQuantizer(config)
    restored.load_state_dict(trained.state_dict())
    checked = []
    original = restored._restart_dead_codes
    restored._restart_dead_codes = lambda flat: (checked.append(int(restored.step)), original(flat))
    for _ in range(6):
        restored(torch.randn(2, 4, 3, 3))
    assert checked == [12, 15]


def test_the_weights_average_is_litemas():
    """LitEma's update (taming, Open-MAGVIT2): the n-th moves each trainable weight's average by 1 - d towards it,
    d = min(decay, (1 + n) / (10 + n)); buffers and frozen weights are copied; the state comes back whole."""
    from vqtok.config import ModelConfig, QuantizerConfig
    from vqtok.train import WeightsEMA

    torch.manual_seed(0)
    model = build_tokenizer(ModelConfig(hidden_channels=8, image_size=16, quantizer=QuantizerConfig(16, 4)))
    model.encoder.to_code.requires_grad_(False)
    ema = WeightsEMA(model, decay=0.5)
    shadow = {name: p.detach().clone() for name, p in model.named_parameters()}
    for n in range(1, 5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
            model.quantizer.step += 1
        ema.update(model)
        decay = min(0.5, (1 + n) / (10 + n))
        for name, p in model.named_parameters():
            shadow[name] = shadow[name] - (1 - decay) * (shadow[name] - p.detach()) if p.requires_grad else p.detach()
    averaged = dict(ema.model.named_parameters())
    for name, expected in shadow.items():
        assert (averaged[name] - expected).abs().max() < 1e-5, name  # lerp rounds apart from the subtraction
    assert torch.equal(averaged["encoder.to_code.weight"], model.encoder.to_code.weight)  # frozen: copied
    assert int(ema.model.quantizer.step) == 4 and not ema.model.training  # buffers copied; in eval mode

    again = WeightsEMA(build_tokenizer(model.config), decay=0.5)
    again.load_state_dict(ema.state_dict())
    assert again.updates == 4
    assert_same_tensors(again.model.state_dict(), ema.model.state_dict())


# ------------------------------------------------------------------------ recipes, and a LlamaGen fine-tune


def test_the_llamagen_recipe_fine_tunes_an_imported_vq16_as_it_is():
    """The recipe's [model] is what `vqtok import llamagen` makes of vq_ds16_c2i.pt: --init accepts it unchanged."""
    from vqtok.config import fine_tune_config
    from vqtok.tokenizers.importers import imported_config

    vq16 = imported_config(
        codebook_size=16384,
        code_dim=8,
        normalize_codes=True,
        base_channels=128,
        channel_mult=(1, 1, 2, 2, 4),
        num_res_blocks=2,
        attn_levels=(4,),
        z_channels=256,
        image_size=256,
    )
    assert fine_tune_config(vq16, PIPELINES / "llamagen-vq16.toml") == vq16
    model, train = load_config(PIPELINES / "llamagen-vq16.toml", model_class=VQGANConfig)
    assert model == vq16
    assert (train.lr, train.betas, train.grad_clip, train.warmup_steps, train.min_lr_ratio) == (
        1e-4,
        (0.9, 0.95),
        1.0,
        0,
        1.0,
    )
    objective = load_objective_config(PIPELINES / "llamagen-vq16.toml")
    assert (objective.pixel_loss, objective.perceptual_weight, objective.disc_weight, objective.disc_start) == (
        "l2",
        1.0,
        0.5,
        20000,
    )
    assert not objective.adaptive_weight


def test_the_taming_recipes_restate_tamings_configs():
    for name, K, weight, start, layers in (
        ("taming-f16-16384.toml", 16384, 0.75, 0, 2),
        ("taming-imagenet-vqgan.toml", 1024, 0.8, 250001, 3),
    ):
        model, train = load_config(PIPELINES / name, model_class=VQGANConfig)
        objective = load_objective_config(PIPELINES / name)
        assert (model.quantizer.codebook_size, model.quantizer.code_dim, model.stride) == (K, 256, 16)
        assert (objective.disc_weight, objective.disc_start, objective.disc_layers) == (weight, start, layers)
        assert objective.adaptive_weight and objective.pixel_loss == "l1" and objective.perceptual_weight == 1
        assert train.betas == (0.5, 0.9) and train.lr == pytest.approx(4.5e-6 * train.batch_size)
        # taming's quantizer loss, commitment + 0.25 * codebook, in vqtok's terms
        assert objective.codebook_weight * model.quantizer.beta == 1 and objective.codebook_weight == 0.25


def test_an_imported_llamagen_fine_tunes_its_decoder_with_llamagens_objective(
    shards, lpips_files, tmp_path, monkeypatch
):
    """vqtok import llamagen of a training checkpoint, then fit --init with the recipe's [objective] and [train]
    (on a network as small as the test's LlamaGen checkpoint): the discriminator starts from the checkpoint's and
    plays without the adaptive weight, the codes stay the parent's, and the model directory holds the tokenizer
    and the discriminator it trained."""
    train, _ = shards
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    trained_with = taming_discriminator(seed=1, filters=64, layers=2)
    checkpoint = {"model": llamagen_vq((1, 2), images).state_dict(), "discriminator": trained_with.state_dict()}
    torch.save(checkpoint, tmp_path / "vq.pt")
    parent = tmp_path / "llamagen"
    assert CliRunner().invoke(cli, ["import", "llamagen", str(tmp_path / "vq.pt"), str(parent)]).exit_code == 0

    tables = tomllib.loads((PIPELINES / "llamagen-vq16.toml").read_text())
    quick = {"steps": 3, "batch_size": 4, "num_workers": 0, "mixed_precision": "no", "log_every": 1}
    objective = {**tables["objective"], "disc_layers": 2}  # 16 px crops: three strided layers leave no patch
    recipe = write_recipe(tmp_path / "r.toml", {"objective": objective, "train": {**tables["train"], **quick}})
    out = tmp_path / "run"
    args = ["fit", *train, "--out", str(out), "--init", str(parent), "--train", "decoder", "--config", str(recipe)]
    result = CliRunner().invoke(cli, [*args, "--image-size", "16", "--disc-start", "1", *weights_options(lpips_files)])
    assert result.exit_code == 0, result.output

    logged = [m for m in read_metrics(out) if "loss" in m]
    assert [m.get("d_weight") for m in logged] == [None, 0.5, 0.5]  # disc_weight itself: no adaptive weight
    assert all(math.isfinite(m["g_loss"]) and math.isfinite(m["perceptual"]) for m in logged[1:])
    model, imported = load_tokenizer(out / "model"), load_tokenizer(parent)
    assert model.codes_id == imported.codes_id and model.model_id != imported.model_id
    assert sorted(p.name for p in (out / "model").iterdir()) == [
        "config.json",
        "discriminator.safetensors",
        "model.safetensors",
    ]
    assert set(load_file(str(out / "model" / "model.safetensors"))) == set(imported.state_dict())
    # the discriminator went on from the checkpoint's: it moved from those weights, not from a new initialisation
    parents = {name: t for name, t in trained_with.state_dict().items() if name.endswith("weight")}
    _, child = read_discriminator(out / "model")
    assert json.loads((out / "run.json").read_text())["parent"]["discriminator_id"] == weights_hash(
        read_discriminator(parent)[1]
    )
    moved = [(child[name] - weight).abs().max().item() for name, weight in parents.items()]
    assert 0 < max(moved) < 0.01  # 2 steps of Adam at 1e-4 from it; a fresh one differs by about its scale, 0.02


def test_fit_init_refuses_a_discriminator_unlike_the_parents_in_one_line(shards, tmp_path):
    """The parent keeps a PatchGAN of 2 layers: a recipe of another shape could not start from it."""
    train, _ = shards
    parent = tmp_path / "parent"
    shape = {name: value for name, value in TINY_VQGAN.items() if name != "family"}
    build_tokenizer(load_config(model=shape, model_class=VQGANConfig)[0]).save_pretrained(parent)
    save_discriminator(parent, taming_discriminator(filters=8, layers=1))
    out = tmp_path / "run"
    args = ["fit", *train, "--out", str(out), "--init", str(parent), "--disc-weight", "0.5", "--steps", "2"]
    result = CliRunner().invoke(cli, [*args, "--image-size", "32"])
    assert result.exit_code == 1
    assert result.output.strip().splitlines()[-1] == (
        f"Error: --init {parent} keeps a discriminator of 1 layer and 8 filters, the objective's has 3 and 64: "
        "set disc_layers = 1 and disc_filters = 8 in [objective] to start from it"
    )
    assert not out.exists()
