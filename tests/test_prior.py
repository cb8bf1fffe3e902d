"""The prior: the model's sampling (cache, greedy, guidance, seeds), `vqtok prior fit` in one process and two,
kill and resume, tokens of a killed encode (--partial), the picture of samples, refusals, and the loop tokens ->
prior -> sampled grids -> `vqtok decode` -> images."""

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    checkpoint_files,
    image_samples,
    kill_and_resume,
    kill_when,
    killed_progress,
    launch_two_processes,
    read_metrics,
)
from PIL import Image

from vqtok import VQVAE
from vqtok.cli import cli
from vqtok.config import PriorConfig, PriorTrainConfig, load_config
from vqtok.pictures import BAND, GAP, draw_texts
from vqtok.pretrained import read_header
from vqtok.prior import Prior
from vqtok.prior.fit import save_sample_picture
from vqtok.tokens import TokenSettings, TokenStore, read_codes
from vqtok.tokens.format import STATS_DIR

CLASSES, CODES_PER_CLASS = 8, 4  # class c's grids are drawn from the codes [4c, 4c + 4) of K = 32
TINY = ["--layers", "2", "--width", "32", "--heads", "2", "--batch-size", "32", "--num-workers", "0"]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    """Tiny priors gain nothing from threads, and on a busy machine threads waiting for each other at every small
    operation cost many times the work itself."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # for the runs in subprocesses
    yield
    torch.set_num_threads(threads)


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def class_grids(per_class: int, seed: int) -> tuple[np.ndarray, list[int]]:
    """(N, 4, 4) grids whose codes are uniform over their class's four codes, and the classes."""
    rng = np.random.default_rng(seed)
    labels = [c for c in range(CLASSES) for _ in range(per_class)]
    grids = np.stack([CODES_PER_CLASS * c + rng.integers(0, CODES_PER_CLASS, (4, 4)) for c in labels])
    return grids, labels


def write_tokens(path, tokenizer, grids, labels, shards=2, model_id=None):
    """A token dataset as `vqtok encode --keep cls` writes it, of the tokenizer in directory `tokenizer`."""
    header = read_header(tokenizer)
    settings = TokenSettings(
        model_id=model_id or header["model_id"],
        codebook_size=header["config"]["quantizer"]["codebook_size"],
        grid=(4, 4),
        image_size=header["config"]["image_size"],
        preprocessing="made by the test",
        keep=("cls",),
    )
    store = TokenStore(path, settings)
    names = [f"shard-{i}" for i in range(shards)]
    store.open(names, names)
    for i, name in enumerate(names):
        rows = list(range(i, len(grids), shards))
        writer = store.writer(name)
        writer.add([f"{path.name}/{r}" for r in rows], grids[rows], {"cls": [labels[r] for r in rows]})
        writer.commit({"status": "done"})
    store.finish(names)
    return path


@pytest.fixture
def tokens(model_dir, tmp_path):
    """Training and held-out tokens of the conftest's tiny tokenizer (K = 32, 4x4 grids), eight classes."""
    train = write_tokens(tmp_path / "train.parquet", model_dir, *class_grids(48, seed=0))
    val = write_tokens(tmp_path / "val.parquet", model_dir, *class_grids(8, seed=1), shards=1)
    return train, val


def tiny_prior(num_classes=CLASSES, seed=0, **config) -> Prior:
    torch.manual_seed(seed)
    settings = {"layers": 2, "width": 32, "heads": 2, "codebook_size": 32, "grid": (4, 5), **config}
    return Prior(PriorConfig(num_classes=num_classes, **settings)).eval()


def seeded(seed=1):
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- the model


def test_loss_is_the_mean_negative_log_likelihood():
    prior = tiny_prior()
    codes, cls = torch.randint(0, 32, (6, 4, 5)), torch.arange(6)
    logits, loss = prior(codes, cls)
    assert logits.shape == (6, 20, 32)
    log_prob = prior.log_prob(codes, cls)
    assert log_prob.shape == (6,) and (log_prob < 0).all()
    assert torch.allclose(loss, -log_prob.mean() / 20, atol=1e-6)
    assert not torch.allclose(prior.log_prob(codes, None), log_prob)  # the class counts


def test_cached_sampling_gives_the_codes_of_recomputing_every_prefix():
    prior = tiny_prior()
    for options in ({"temperature": 0}, {}, {"top_k": 5, "top_p": 0.9}, {"guidance": 2.0}):
        cls = torch.arange(16) % CLASSES
        cached = prior.sample(16, cls=cls, generator=seeded(), **options)
        recomputed = prior.sample(16, cls=cls, cache=False, generator=seeded(), **options)
        assert cached.dtype == torch.int64 and cached.shape == (16, 4, 5)
        assert torch.equal(cached, recomputed), options


def test_top_k_1_is_greedy_and_temperature_spreads():
    prior = tiny_prior()
    greedy = prior.sample(8, cls=3, temperature=0)
    assert torch.equal(prior.sample(8, cls=3, top_k=1, generator=seeded()), greedy)
    assert torch.equal(greedy[0].expand(8, 4, 5), greedy)  # one class, no randomness: one grid
    assert len({tuple(g.flatten().tolist()) for g in prior.sample(8, cls=3, generator=seeded())}) == 8


def test_guidance_0_is_conditional_and_minus_1_unconditional():
    prior = tiny_prior()
    conditional = prior.sample(16, cls=2, generator=seeded())
    unconditional = prior.sample(16, cls=None, generator=seeded())
    assert not torch.equal(conditional, unconditional)
    assert torch.equal(prior.sample(16, cls=2, guidance=0.0, generator=seeded()), conditional)
    assert torch.equal(prior.sample(16, cls=2, guidance=-1.0, generator=seeded()), unconditional)
    guided = prior.sample(16, cls=2, guidance=3.0, generator=seeded())
    assert not torch.equal(guided, conditional) and not torch.equal(guided, unconditional)


def test_a_seed_gives_the_same_grids_however_they_are_split():
    prior = tiny_prior()
    whole = prior.sample(10, cls=1, generator=seeded(7))
    generator = seeded(7)
    parts = torch.cat([prior.sample(3, cls=1, generator=generator), prior.sample(7, cls=1, generator=generator)])
    assert torch.equal(whole, parts)
    assert not torch.equal(whole, prior.sample(10, cls=1, generator=seeded(8)))


def test_prior_refuses_classes_it_does_not_have():
    with pytest.raises(ValueError, match="unconditional"):
        tiny_prior(num_classes=0).sample(2, cls=0)
    with pytest.raises(ValueError, match=r"classes must lie in \[0, 8\)"):
        tiny_prior().sample(2, cls=8)
    with pytest.raises(ValueError, match="guidance needs classes"):
        tiny_prior().sample(2, guidance=1.0)


def test_save_and_load_keep_the_prior(tmp_path):
    prior = tiny_prior(tokenizer="abc", image_size=16)
    prior.save_pretrained(tmp_path / "p")
    assert read_header(tmp_path / "p")["kind"] == "prior"
    loaded = Prior.from_pretrained(tmp_path / "p")
    assert loaded.config == prior.config and loaded.model_id == prior.model_id
    assert torch.equal(loaded.sample(4, cls=0, temperature=0), prior.sample(4, cls=0, temperature=0))
    with pytest.raises(Exception, match="holds a prior, not a tokenizer"):
        VQVAE.from_pretrained(tmp_path / "p")


def test_recipes_in_pipelines_load():
    def recipe(name):
        path = Path(__file__).resolve().parent.parent / "pipelines" / f"{name}.toml"
        return load_config(path, model_class=PriorConfig, train_class=PriorTrainConfig)

    # The small recipe is the defaults, its warm-up given as the 100 steps the default comes to over its 5000.
    small, small_train = recipe("prior-cpu-small")
    assert (small, dataclasses.replace(small_train, warmup_steps=None)) == (PriorConfig(), PriorTrainConfig())
    assert small_train.warmup == PriorTrainConfig().warmup == 100
    big, train = recipe("prior-llamagen-b")
    assert (big.layers, big.width, big.heads, train.mixed_precision) == (12, 768, 12, "bf16")


# ---------------------------------------------------------------------------------------------- vqtok prior fit


pytestmark_fit = pytest.mark.usefixtures("fresh_accelerate_state")


@pytestmark_fit
def test_fit_one_process_then_sample_and_decode(model_dir, tokens, tmp_path):
    train, val = tokens
    out = tmp_path / "run"
    args = ["prior", "fit", train, "--out", out, "--val", val, "--cond", "cls", *TINY, "--steps", "6"]
    result = invoke(*args, "--eval-every", "3", "--save-every", "2", "--tokenizer", model_dir, "--lr", "3e-3")
    assert result.exit_code == 0, result.output
    assert "held-out" in result.output and "bits per code" in result.output

    prior = Prior.from_pretrained(out / "model")
    tokenizer = read_header(model_dir)
    assert prior.config.tokenizer == tokenizer["model_id"] and prior.config.image_size == 16
    assert (prior.config.codebook_size, prior.config.grid, prior.config.num_classes) == (32, (4, 4), CLASSES)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000004", "step-000006"]
    picture = Image.open(out / "samples" / "step-000006.png")
    assert picture.size == (8 * 128 + 7 * GAP, BAND + 8 * (BAND + 128))  # 8 classes by 8 samples, 16 px shown 8x
    val_entries = [m for m in read_metrics(out) if m["split"] == "val"]
    assert [m["step"] for m in val_entries] == [3, 6] and val_entries[-1]["grids"] == 64
    assert 0 < val_entries[-1]["bits_per_code"] < 5.5  # from about log2(32) = 5 bits

    info = invoke("info", out / "model", "--json")
    assert info.exit_code == 0, info.output
    summary = json.loads(info.output)
    assert summary["kind"] == "prior" and summary["tokenizer"] == tokenizer["model_id"]
    assert summary["num_classes"] == CLASSES and summary["grid"] == [4, 4]

    samples = tmp_path / "samples.parquet"
    sampled = invoke("prior", "sample", out, samples, "--per-class", "2", "--seed", "5")  # the run folder
    assert sampled.exit_code == 0, sampled.output
    assert "sampled 16 grids" in sampled.output
    keys, codes = read_codes(samples)
    assert codes.shape == (16, 4, 4) and (codes >= 0).all() and (codes < 32).all()
    assert [int(c) for c in __import__("pandas").read_parquet(samples)["cls"]] == [c for c in range(8) for _ in "ab"]

    images = tmp_path / "images"
    decoded = invoke("decode", samples, images, "--model", model_dir)
    assert decoded.exit_code == 0, decoded.output
    expected = VQVAE.from_pretrained(model_dir).decode(torch.from_numpy(codes))
    expected = (expected * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for key, pixels in zip(keys, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(images / f"{key}.png")), pixels)

    torch.manual_seed(1)
    other = VQVAE(VQVAE.from_pretrained(model_dir).config).save_pretrained(tmp_path / "other")
    refused = invoke("decode", samples, tmp_path / "x", "--model", other)
    assert refused.exit_code == 1 and "were made by model" in refused.output


@pytestmark_fit
def test_class_conditional_training_lowers_held_out_bits_and_samples_follow_the_class(tokens, tmp_path):
    train, val = tokens
    bits = {}
    for name, extra in (("cond", ["--cond", "cls"]), ("uncond", [])):
        args = ["prior", "fit", train, "--out", tmp_path / name, "--val", val, *TINY, "--steps", "150"]
        result = invoke(*args, "--lr", "3e-3", "--eval-every", "1000", *extra)
        assert result.exit_code == 0, result.output
        bits[name] = [m for m in read_metrics(tmp_path / name) if m["split"] == "val"][-1]["bits_per_code"]
    # The best possible: 2 bits per code knowing the class; 2 + 3/16 without it (3 bits for the first code).
    assert bits["cond"] < bits["uncond"] - 0.05, bits

    samples = tmp_path / "samples.parquet"
    result = invoke("prior", "sample", tmp_path / "cond" / "model", samples, "--cls", "0,7", "--n", "64")
    assert result.exit_code == 0, result.output
    _, codes = read_codes(samples)
    histograms = [np.bincount(codes[c::2].ravel(), minlength=32) / codes[c::2].size for c in (0, 1)]
    wanted = [np.bincount(np.arange(4 * c, 4 * c + 4), minlength=32) / 4 for c in (0, 7)]
    for mine, other in ((0, 1), (1, 0)):
        assert np.abs(histograms[mine] - wanted[mine]).sum() < np.abs(histograms[mine] - wanted[other]).sum()
        assert histograms[mine] @ (wanted[mine] > 0) > 0.8  # most codes are the class's own


@pytestmark_fit
def test_sampling_is_reproducible_and_resumes(model_dir, tmp_path):
    prior_dir = tiny_prior(grid=(4, 4), tokenizer=read_header(model_dir)["model_id"], image_size=16)
    prior_dir = prior_dir.save_pretrained(tmp_path / "prior")
    runs = {}
    for name, extra in (("a", []), ("b", ["--batch-size", "7"]), ("c", ["--seed", "1"])):
        result = invoke("prior", "sample", prior_dir, tmp_path / name, "--n", "20", "--cls", "3", *extra)
        assert result.exit_code == 0, result.output
        runs[name] = read_codes(tmp_path / name)[1]
    assert np.array_equal(runs["a"], runs["b"]) and not np.array_equal(runs["a"], runs["c"])

    again = invoke("prior", "sample", prior_dir, tmp_path / "a", "--n", "20", "--cls", "3")
    assert again.exit_code == 0 and "sampled 0 grids" in again.output and "1 shard already done" in again.output
    other = invoke("prior", "sample", prior_dir, tmp_path / "a", "--n", "20", "--cls", "4")
    assert other.exit_code == 1 and "other settings" in other.output and "--overwrite" in other.output


@pytestmark_fit
def test_fit_two_processes_ends_with_identical_weights(tokens, tmp_path):
    train, val = tokens
    out = tmp_path / "run"
    fit = ["prior", "fit", train, "--out", out, "--val", val, "--cond", "cls", *TINY]
    proc = launch_two_processes(*fit, "--steps", "6", "--save-every", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = read_metrics(out)[-1]
    assert final["processes"] == 2 and len(final["weights_digests"]) == 2
    assert len(set(final["weights_digests"])) == 1
    assert final["weights_digests"][0] == Prior.from_pretrained(out / "model").model_id
    assert [m["grids"] for m in read_metrics(out) if m["split"] == "val"] == [64]  # both halves of one row group
    assert (proc.stdout + proc.stderr).count("exported prior to") == 1
    # the shared state once, from the main process, and each process's own random states
    assert sorted(p.name for p in (out / "checkpoints" / "step-000006").iterdir()) == checkpoint_files(2)


@pytestmark_fit
def test_killed_run_resumes_from_its_checkpoint(tokens, tmp_path):
    train, _ = tokens
    out = tmp_path / "run"
    command = [sys.executable, "-m", "vqtok", "prior", "fit", str(train), "--out", str(out), *TINY]
    command += ["--steps", "100", "--save-every", "5", "--cond", "cls"]
    kill_and_resume(command, out, 100, ["--width", "16"], "width")
    assert Prior.from_pretrained(out / "model").config.num_classes == CLASSES


@pytestmark_fit
def test_fit_refuses_a_killed_encode_and_with_partial_trains_on_its_committed_rows(
    model_dir, tokens, make_shard, tmp_path
):
    shards = [make_shard(f"k-{i:02d}.tar", image_samples([f"k{i}-{j}" for j in range(6)], seed=i)) for i in range(40)]
    killed = tmp_path / "killed.parquet"
    command = [sys.executable, "-m", "vqtok", "encode", *shards, str(killed), "--model", model_dir]
    done = kill_when(
        command + ["--num-workers", "0", "--batch-size", "2"], lambda: len(list((killed / STATS_DIR).glob("*.json"))), 3
    )
    assert 3 <= done < 40, "the encode was not killed mid-way"
    committed, _ = read_codes(killed, partial=True)
    assert len(committed) == 6 * done
    progress = killed_progress(killed, done, 40)

    out = tmp_path / "run"
    train, _ = tokens
    for inputs in ([killed], [train, "--val", killed]):  # the training tokens and the held-out ones alike
        line = one_line_error(invoke("prior", "fit", *inputs, "--out", out, *TINY, "--steps", "2"))
        assert f"{killed} is unfinished: {progress}." in line and "--partial" in line, line
        assert not out.exists()

    args = ["prior", "fit", killed, "--val", killed, "--out", out, "--partial", *TINY, "--steps", "2"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert f"note: {killed} is unfinished ({progress}): read its committed parts only" in result.output
    assert f"trained on {len(committed)} grids" in result.output
    metrics = read_metrics(out)
    (facts,) = [m for m in metrics if "unfinished" in m]
    assert facts["grids"] == facts["val_grids"] == len(committed)
    assert facts["unfinished"] == {str(killed): progress}
    assert [m["grids"] for m in metrics if m["split"] == "val"] == [len(committed)]  # scored on the same rows


@pytestmark_fit
def test_fit_with_a_tokenizer_and_no_val_still_draws_samples(model_dir, tokens, tmp_path):
    train, _ = tokens
    out = tmp_path / "run"
    args = ["prior", "fit", train, "--out", out, "--cond", "cls", *TINY, "--steps", "4", "--eval-every", "2"]
    result = invoke(*args, "--tokenizer", model_dir)
    assert result.exit_code == 0, result.output
    assert "held-out" not in result.output
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert not [m for m in read_metrics(out) if m["split"] == "val"]  # nothing to score without --val


# ---------------------------------------------------------------------------------------------- the picture


@pytest.mark.parametrize("classes", [CLASSES, 0])
def test_sample_picture_enlarges_the_tiles_and_labels_each_row(model_dir, tmp_path, classes):
    prior, tokenizer = tiny_prior(classes, grid=(4, 4)), VQVAE.from_pretrained(model_dir)
    save_sample_picture(prior, tokenizer, tmp_path / "samples.png", step=1500, seed=3)
    pixels = np.asarray(Image.open(tmp_path / "samples.png"))
    labels = [f"class {c}" for c in range(classes)] or ["no class"]
    tile, width = 8 * 16, 8 * 128 + 7 * GAP  # 16 px images shown 8 times larger, eight to a row
    assert pixels.shape == (BAND + len(labels) * (BAND + tile), width, 3)

    def text(words):  # what a band holding these words looks like
        return draw_texts(np.zeros((BAND, width, 3), dtype=np.uint8), [(0, 0, width, words)])

    assert np.array_equal(pixels[:BAND], text("samples at step 1,500")) and pixels[:BAND].max() == 255
    generator = seeded(3)
    for r, label in enumerate(labels):
        top = BAND + r * (BAND + tile)
        band, tiles = pixels[top : top + BAND], pixels[top + BAND : top + BAND + tile]
        assert band.max() == 255 and np.array_equal(band, text(label)), label
        codes = prior.sample(8, cls=r if classes else None, generator=generator)
        images = tokenizer.decode(codes).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for j, image in enumerate(images):
            x = j * (tile + GAP)
            assert np.array_equal(tiles[:, x : x + tile], image.repeat(8, 0).repeat(8, 1))
            assert not tiles[:, x + tile : x + tile + GAP].any()  # black between tiles


# ---------------------------------------------------------------------------------------------- refusals


def one_line_error(result) -> str:
    assert result.exit_code != 0
    lines = result.output.strip().splitlines()
    assert "Traceback" not in result.output and lines[-1].startswith("Error: ")
    assert len([line for line in lines if line.startswith("Error")]) == 1
    return lines[-1]


@pytestmark_fit
def test_fit_refusals_are_one_line_and_come_before_training(model_dir, tokens, tmp_path):
    train, val = tokens
    grids, labels = class_grids(4, seed=2)
    foreign = write_tokens(tmp_path / "foreign.parquet", model_dir, grids, labels, model_id="0123456789abcdef")
    negative = write_tokens(tmp_path / "negative.parquet", model_dir, grids, [-1] + labels[1:])
    out = tmp_path / "run"
    cases = [
        ([train, foreign], [], "hold codes of different tokenizers (model_id"),
        ([train], ["--val", foreign], "--val tokens were made by another tokenizer"),
        ([train], ["--cond", "label"], "no 'label' column"),
        ([train], ["--cond", "cls", "--classes", "4"], "holds class 4, outside [0, 4)"),
        ([negative], ["--cond", "cls"], "holds class -1, outside [0, 8)"),
        ([train], ["--classes", "4"], "no --cond column"),
        ([train], ["--tokenizer", tmp_path / "train.parquet"], "is not a model directory"),
    ]
    for inputs, extra, message in cases:
        line = one_line_error(invoke("prior", "fit", *inputs, "--out", out, *extra))
        assert message in line, (extra, line)
        assert not (out / "checkpoints").exists()


def test_sample_refusals_are_one_line(model_dir, tmp_path):
    model_id = read_header(model_dir)["model_id"]
    conditional = tiny_prior(grid=(4, 4), tokenizer=model_id, image_size=16).save_pretrained(tmp_path / "c")
    unconditional = tiny_prior(0, grid=(4, 4), tokenizer=model_id, image_size=16).save_pretrained(tmp_path / "u")
    cases = [
        (unconditional, ["--cls", "1"], "this prior is unconditional"),
        (unconditional, ["--per-class", "2"], "this prior is unconditional"),
        (conditional, ["--cls", "8"], "this prior's classes are 0 to 7"),
        (conditional, ["--per-class", "2", "--n", "5"], "--n and --per-class exclude each other"),
        (conditional, ["--guidance", "2"], "--guidance needs classes"),
        (conditional, ["--cls", "a"], "classes are integers"),
        (model_dir, [], "holds a tokenizer, not a prior"),
    ]
    for prior_dir, extra, message in cases:
        line = one_line_error(invoke("prior", "sample", prior_dir, tmp_path / "out", *extra))
        assert message in line, (extra, line)
