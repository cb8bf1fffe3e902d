"""Fine-tuning (`vqtok fit --init`): a fitted or an imported tokenizer trained further, all of it or its decoder
alone; the token datasets and prior samples its codes id lets it decode, and the parent that it records."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import image_samples, launch_two_processes, llamagen_vq, read_metrics, reset_accelerate_state, write_shard
from PIL import Image

from vqtok import load_tokenizer
from vqtok.cli import cli
from vqtok.config import PriorConfig
from vqtok.prior import Prior
from vqtok.tokenizers.importers import ImportOptions, import_model
from vqtok.tokens import TokenSettings, TokenStore, read_codes, read_metadata

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")

# What a decoder-only fine-tune may change: the decoder side. Everything else, tensors and buffers, stays the parent's.
DECODER_SIDE = ("decoder.", "post_quant_conv.", "quantizer.project_out.")
TRAIN = ["--batch-size", "4", "--num-workers", "0"]
SIZE = 16


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def fit(*args):
    """vqtok fit in this process, its accelerator state cleared afterwards for the next one."""
    try:
        result = invoke("fit", *args)
    finally:
        reset_accelerate_state()
    assert result.exit_code == 0, result.output
    return result


def refusal(result, exit_code: int = 1) -> str:
    assert result.exit_code == exit_code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def header(model_dir) -> dict:
    return json.loads((model_dir / "config.json").read_text())


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp("finetune")


@pytest.fixture(scope="module")
def shards(folder):
    """Images the parents were trained on, and other images the fine-tunes see."""
    own = write_shard(folder / "own.tar", image_samples([f"o{i}" for i in range(8)], seed=0))
    other = write_shard(folder / "other.tar", image_samples([f"n{i}" for i in range(8)], seed=500))
    return own, other


@pytest.fixture(scope="module")
def parent(folder, shards):
    """A VQ-VAE vqtok fitted, whose quantizer would change its codebook on any step it trained in: moving averages,
    a dead code restarted every step after two idle ones, and a lookup in 3 dimensions after a projection."""
    recipe = folder / "parent.toml"
    recipe.write_text("[model]\ndead_code_window = 2\n")
    out = folder / "parent"
    tiny = ["--hidden", "8", "--codebook-size", "16", "--code-dim", "4", "--lookup-dim", "3", "--image-size", SIZE]
    fit(shards[0], "--out", out, "--config", recipe, *tiny, "--steps", "3", *TRAIN)
    return out / "model"


@pytest.fixture(scope="module")
def imported(folder):
    """A LlamaGen tokenizer imported from random weights (a VQGAN with a learned, l2-normalized codebook)."""
    images = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    torch.save({"model": llamagen_vq((1, 2), images).state_dict()}, folder / "vq.pt")
    import_model("llamagen", folder / "vq.pt", folder / "llamagen", ImportOptions(image_size=SIZE))
    return folder / "llamagen"


@pytest.fixture(scope="module")
def decoder_child(folder, shards, parent):
    out = folder / "decoder-child"
    fit(shards[1], "--out", out, "--init", parent, "--train", "decoder", "--steps", "3", *TRAIN)
    return out / "model"


@pytest.fixture(scope="module")
def all_child(folder, shards, parent):
    out = folder / "all-child"
    fit(shards[1], "--out", out, "--init", parent, "--steps", "3", *TRAIN)
    return out / "model"


@pytest.fixture(scope="module")
def images():
    return torch.rand(6, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(9))


def assert_encode_side_kept(parent_dir, child_dir, images):
    """The child gives the parent's codes, holds the parent's tensors and buffers bit for bit outside the decoder
    side, and a trained decoder: every parameter there moved."""
    parent, child = load_tokenizer(parent_dir), load_tokenizer(child_dir)
    assert torch.equal(parent.encode(images), child.encode(images))
    theirs, ours = parent.state_dict(), child.state_dict()
    assert theirs.keys() == ours.keys()
    kept = [name for name in theirs if not name.startswith(DECODER_SIDE)]
    assert "quantizer.codebook" in kept and any(name.startswith("encoder.") for name in kept)
    for name in kept:
        assert torch.equal(theirs[name], ours[name]), name
    trained = [name for name, _ in child.named_parameters() if name.startswith(DECODER_SIDE)]
    assert trained
    for name in trained:
        assert not torch.equal(theirs[name], ours[name]), name
    return parent, child


# ------------------------------------------------------------------------------------------- fine-tuning


def test_a_decoder_only_fine_tune_keeps_the_codes_and_the_encode_side_bit_for_bit(parent, decoder_child, images):
    _, child = assert_encode_side_kept(parent, decoder_child, images)
    theirs, ours = header(parent), header(decoder_child)
    assert ours["codes_id"] == theirs["codes_id"] == child.codes_id
    assert ours["model_id"] != theirs["model_id"]
    assert ours["parent"] == {
        "path": str(parent),
        "model_id": theirs["model_id"],
        "codes_id": theirs["codes_id"],
        "trained": "decoder",
    }
    run = json.loads((decoder_child.parent / "run.json").read_text())
    assert run["parent"] == ours["parent"]
    # a frozen quantizer counts nothing, so the log reports no training usage
    logged = [m for m in read_metrics(decoder_child.parent) if "loss" in m]
    assert logged and not any("usage" in m for m in logged)


def test_a_decoder_only_fine_tune_of_an_imported_vqgan_keeps_its_codes(imported, shards, images, tmp_path):
    """A learned codebook (a parameter, which the optimizer would move), quant_conv and a normalized lookup."""
    out = tmp_path / "child"
    fit(shards[1], "--out", out, "--init", imported, "--train", "decoder", "--steps", "2", *TRAIN)
    assert_encode_side_kept(imported, out / "model", images)
    assert header(out / "model")["codes_id"] == header(imported)["codes_id"]


def test_a_decoder_only_fine_tune_under_two_processes(parent, shards, images, tmp_path):
    """DDP leaves the frozen parameters out: both processes train, and end with the parent's encode side."""
    out = tmp_path / "child"
    args = ["fit", shards[1], "--out", out, "--init", parent, "--train", "decoder", "--steps", "3"]
    proc = launch_two_processes(*args, "--batch-size", "4", "--num-workers", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert read_metrics(out)[-1]["processes"] == 2
    assert_encode_side_kept(parent, out / "model", images)


def test_an_all_weights_fine_tune_of_an_imported_model_starts_from_its_codebook(imported, shards, tmp_path):
    """The imported quantizer is initialised already (kmeans_init false): k-means does not replace its codebook,
    which one Adam step of --lr moves by at most lr. Both ids change, and the parent is recorded with its source."""
    parent = load_tokenizer(imported)
    assert bool(parent.quantizer.initialized) and not parent.config.quantizer.kmeans_init
    out = tmp_path / "child"
    fit(shards[1], "--out", out, "--init", imported, "--steps", "1", "--lr", "1e-4", *TRAIN)
    child = load_tokenizer(out / "model")
    moved = (child.quantizer.codebook - parent.quantizer.codebook).abs().max().item()
    assert 0 < moved <= 1e-4 * 1.001
    assert bool(child.quantizer.initialized)

    theirs, ours = header(imported), header(out / "model")
    assert ours["model_id"] != theirs["model_id"] and ours["codes_id"] != theirs["codes_id"]
    assert "source" not in ours  # the child was trained, not imported: its parent was
    assert ours["parent"] == {
        "path": str(imported),
        "model_id": theirs["model_id"],
        "codes_id": theirs["codes_id"],
        "trained": "all",
        "source": theirs["source"],
    }
    assert json.loads((out / "run.json").read_text())["parent"] == ours["parent"]

    summary = json.loads(invoke("info", out / "model", "--json").output)
    assert summary["parent"] == ours["parent"] and summary["codes_id"] == ours["codes_id"]
    table = CliRunner().invoke(cli, ["info", str(out / "model")], env={"COLUMNS": "300"}).output
    for row in (
        f"fine-tuned from │ {imported}",
        f"parent model id │ {theirs['model_id']}",
        f"parent codes id │ {theirs['codes_id']}",
        "trained │ every weight",
        "parent imported from │ vq.pt (llamagen)",
        f"codes id │ {ours['codes_id']}",
    ):
        assert row in " ".join(table.split()), row


def test_a_fine_tune_of_a_fine_tune_records_the_lineage(decoder_child, shards, tmp_path):
    out = tmp_path / "grandchild"
    fit(shards[0], "--out", out, "--init", decoder_child, "--train", "decoder", "--steps", "1", *TRAIN)
    record = header(out / "model")["parent"]
    assert record["model_id"] == header(decoder_child)["model_id"]
    assert record["parent"] == header(decoder_child)["parent"]
    table = CliRunner().invoke(cli, ["info", str(out / "model")], env={"COLUMNS": "300"}).output
    assert f"parent fine-tuned from │ {record['parent']['path']} (model id" in " ".join(table.split())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--codebook-size", "32"], "--codebook-size: a fine-tune keeps the model's shape (codebook_size = 16)"),
        (["--code-dim", "8"], "--code-dim: a fine-tune keeps the model's shape (code_dim = 4)"),
        (["--hidden", "16"], "--hidden: a fine-tune keeps the model's shape (hidden_channels = 8)"),
        (["--res-channels", "8"], "--res-channels: a fine-tune keeps the model's shape (res_channels = 32)"),
        (["--res-blocks", "1"], "--res-blocks: a fine-tune keeps the model's shape (num_res_blocks = 2)"),
        (["--lookup-dim", "2"], "--lookup-dim: a fine-tune keeps the model's shape (lookup_dim = 3)"),
        (
            ["--normalize-codes"],
            "--normalize-codes/--no-normalize-codes: a fine-tune keeps the lookup its codebook was learned in",
        ),
        (["--no-ema"], "--no-ema: the model's codebook is learned as a moving average (decay 0.99)"),
        (["--family", "vqgan"], "is a vqvae tokenizer, and a fine-tune keeps its family"),
        (["recipe", "[model]\ncode_dim = 8\n"], "recipe.toml: [model] code_dim: a fine-tune keeps the model's shape"),
        (["recipe", "[model.quantizer]\ncodebook_size = 8\n"], "recipe.toml: [model] codebook_size: a fine-tune keeps"),
        (
            ["recipe", '[model]\nfamily = "vqgan"\n'],
            "says family = 'vqgan' in [model]; the model fine-tuned is a vqvae",
        ),
    ],
)
def test_options_that_would_change_the_parents_shape_are_refused(parent, shards, tmp_path, args, message):
    if args[0] == "recipe":
        (tmp_path / "recipe.toml").write_text(args[1])
        args = ["--config", tmp_path / "recipe.toml"]
    out = tmp_path / "run"
    line = refusal(invoke("fit", shards[1], "--out", out, "--init", parent, *args, *TRAIN))
    assert message in line
    assert not out.exists()  # refused before anything was written


def test_refusals_for_a_learned_codebook_a_vqgan_and_no_parent(imported, shards, tmp_path):
    out = tmp_path / "run"
    line = refusal(invoke("fit", shards[1], "--out", out, "--init", imported, "--decay", "0.9"))
    assert "--decay: the model's codebook is learned by the codebook loss, and a fine-tune keeps it so" in line
    line = refusal(invoke("fit", shards[1], "--out", out, "--init", imported, "--res-blocks", "2"), exit_code=2)
    assert "--res-blocks: VQ-VAE options" in line
    line = refusal(invoke("fit", shards[1], "--out", out, "--train", "decoder"))
    assert "--train decoder fine-tunes a model: give the one to start from with --init" in line
    assert not out.exists()


def test_settings_that_keep_the_shape_may_change(parent, shards, tmp_path):
    """The crop size, beta, the EMA's decay and a recipe's dead-code window and [train] table; a recipe value equal
    to the parent's (hidden_channels) changes nothing and passes."""
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[model]\nhidden_channels = 8\ndead_code_window = 5\n[train]\nsteps = 1\n")
    out = tmp_path / "run"
    fit(shards[1], "--out", out, "--init", parent, "--config", recipe, "--image-size", "8", "--beta", "0.5")
    config = load_tokenizer(out / "model").config
    assert (config.image_size, config.hidden_channels) == (8, 8)
    assert (config.quantizer.beta, config.quantizer.dead_code_window, config.quantizer.decay) == (0.5, 5, 0.99)
    assert [m["step"] for m in read_metrics(out) if "loss" in m] == [1]

    fit(shards[1], "--out", tmp_path / "decay", "--init", parent, "--decay", "0.9", "--steps", "1", *TRAIN)
    assert load_tokenizer(tmp_path / "decay" / "model").config.quantizer.decay == 0.9


def test_resuming_a_fine_tune_checks_its_parent(parent, shards, tmp_path):
    out = tmp_path / "run"

    def command(*fine_tune):
        return [shards[1], "--out", out, *fine_tune, "--save-every", "2", *TRAIN]

    fit(*command("--init", parent, "--train", "decoder"), "--steps", "4")
    other = tmp_path / "other"  # the same shape, other weights
    model = load_tokenizer(parent)
    with torch.no_grad():
        model.decoder.from_code.bias.add_(1)
    model.save_pretrained(other)
    for fine_tune, changed in [
        (["--init", other, "--train", "decoder"], "parent.model_id"),
        (["--init", parent], "parent.trained"),
        ([], "parent changed"),  # not a fine-tune at all
    ]:
        try:
            line = refusal(invoke("fit", *command(*fine_tune), "--steps", "6", "--resume"))
        finally:
            reset_accelerate_state()
        assert "--resume with other settings than" in line and changed in line, line

    fit(*command("--init", parent, "--train", "decoder"), "--steps", "6", "--resume")
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "resumed_from" in m] == [0, 4]
    assert [m["step"] for m in metrics if "loss" in m][-1] == 6
    assert header(out / "model")["codes_id"] == header(parent)["codes_id"]


# ------------------------------------------------------------------------------------------- tokens


def test_the_parents_tokens_decode_with_a_decoder_only_child_and_not_with_an_all_weights_one(
    parent, decoder_child, all_child, shards, tmp_path
):
    tokens = tmp_path / "tokens.parquet"
    encoded = invoke("encode", shards[0], tokens, "--model", parent, "--num-workers", "0")
    assert encoded.exit_code == 0, encoded.output
    assert read_metadata(tokens)["codes_id"] == header(parent)["codes_id"]
    assert header(all_child)["codes_id"] != header(parent)["codes_id"]

    decoded = invoke("decode", tokens, tmp_path / "images", "--model", decoder_child)
    assert decoded.exit_code == 0, decoded.output
    keys, codes = read_codes(tokens)

    def pixels(model_dir):
        images = load_tokenizer(model_dir).decode(torch.from_numpy(codes))
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()

    expected, parents = pixels(decoder_child), pixels(parent)
    assert not np.array_equal(expected, parents)  # the child's decoder is its own
    for key, image in zip(keys, expected, strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / f"{key}.png")), image), key

    refused = refusal(invoke("decode", tokens, tmp_path / "refused", "--model", all_child))
    assert f"the codes were made by model {header(parent)['model_id']}, not by this one" in refused
    assert "--force decodes them anyway" in refused
    forced = invoke("decode", tokens, tmp_path / "forced", "--model", all_child, "--force")
    assert forced.exit_code == 0, forced.output

    # A dataset written before codes ids says only which model made it: that model alone decodes it.
    old = tmp_path / "old.parquet"
    settings = TokenSettings(header(parent)["model_id"], 16, (4, 4), SIZE, "crop")
    store = TokenStore(old, settings)
    store.open(["s"], ["s"])
    writer = store.writer("s")
    writer.add(keys, codes)
    writer.commit({"status": "done"})
    store.finish(["s"])
    assert "codes_id" not in read_metadata(old)
    assert invoke("decode", old, tmp_path / "old-images", "--model", parent).exit_code == 0
    assert "were made by model" in refusal(invoke("decode", old, tmp_path / "old-child", "--model", decoder_child))


def test_samples_of_a_prior_on_the_parents_tokens_decode_with_the_decoder_only_child(
    parent, decoder_child, all_child, shards, tmp_path
):
    tokens = tmp_path / "tokens.parquet"
    assert invoke("encode", shards[0], tokens, "--model", parent, "--num-workers", "0").exit_code == 0
    tiny = ["--layers", "1", "--width", "16", "--heads", "2", "--steps", "2", *TRAIN]
    try:  # --tokenizer: the model that draws the run's sample pictures, which the child's codes let it be
        refused = invoke("prior", "fit", tokens, "--out", tmp_path / "no", *tiny, "--tokenizer", all_child)
        trained = invoke("prior", "fit", tokens, "--out", tmp_path / "prior", *tiny, "--tokenizer", decoder_child)
    finally:
        reset_accelerate_state()
    assert "but the tokens were made by model" in refusal(refused)
    assert trained.exit_code == 0, trained.output
    assert (tmp_path / "prior" / "samples" / "step-000002.png").is_file()
    prior_config = header(tmp_path / "prior" / "model")["config"]
    assert (prior_config["tokenizer"], prior_config["codes_id"]) == (
        header(parent)["model_id"],
        header(parent)["codes_id"],
    )

    samples = tmp_path / "samples.parquet"
    assert invoke("prior", "sample", tmp_path / "prior", samples, "--n", "3").exit_code == 0
    assert read_metadata(samples)["codes_id"] == header(parent)["codes_id"]
    decoded = invoke("decode", samples, tmp_path / "images", "--model", decoder_child)
    assert decoded.exit_code == 0, decoded.output
    assert len(list((tmp_path / "images").glob("*.png"))) == 3
    assert "were made by model" in refusal(invoke("decode", samples, tmp_path / "no", "--model", all_child))

    # A prior saved before codes ids knows its tokenizer's model id alone: its samples decode with that model only.
    small = {"layers": 1, "width": 16, "heads": 2, "codebook_size": 16, "grid": (4, 4), "image_size": SIZE}
    Prior(PriorConfig(tokenizer=header(parent)["model_id"], **small)).save_pretrained(tmp_path / "old-prior")
    old_samples = tmp_path / "old-samples.parquet"
    assert invoke("prior", "sample", tmp_path / "old-prior", old_samples, "--n", "2").exit_code == 0
    assert "codes_id" not in read_metadata(old_samples)
    assert invoke("decode", old_samples, tmp_path / "old", "--model", parent).exit_code == 0
    assert "were made by model" in refusal(invoke("decode", old_samples, tmp_path / "old-no", "--model", decoder_child))
