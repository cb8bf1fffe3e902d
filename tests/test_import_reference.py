"""`vqtok import diffusers` and `vqtok import llamagen` against the reference implementations, on random weights
made here (nothing is downloaded), and every vqtok command run on an imported model.

diffusers' own `VQModel` is installed: its codes and images are the reference. LlamaGen is not packaged: its
VQModel is rebuilt in conftest.py (`LlamaGenVQ`) from its published tokenizer/tokenizer_image/vq_model.py, with
its module tree and key names and its forward (the encoder, the l2-normalized lookup, the decoder), out of
taming-transformers' blocks, which LlamaGen's file is modified from and whose residual, attention and resampling
blocks compute as its do.
"""

import argparse
import hashlib
import inspect
import json
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    class_images,
    image_samples,
    llamagen_vq,
    taming_discriminator,
    vq_model,
    write_hf_parquet,
    write_image_folder,
    write_shard,
)
from PIL import Image
from safetensors.torch import load_file, save_file

from vqtok import load_tokenizer
from vqtok.cli import cli
from vqtok.data import iter_samples, sample_image
from vqtok.tokenizers.discriminator_file import read_discriminator
from vqtok.tokenizers.importers import VQMODEL_DEFAULTS
from vqtok.tokens import read_codes

SIZE = 16  # the images' size in the command tests: 8x8 grids of the stride-2 test model


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def one_line_error(result) -> str:
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


@pytest.fixture(scope="module")
def images():
    return torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ---------------------------------------------------------------------------------------------- diffusers


def vq_model_reference(model, images):
    """VQModel's own codes (B, h, w) for images in [0, 1], and its decoded images in about [-1, 1]."""
    with torch.no_grad():
        h = model.encode(images * 2 - 1).latents  # (B, D, h, w)
        _, _, (_, _, indices) = model.quantize(h)
        decoded = model.decode(h).sample
    return indices.view(h.shape[0], h.shape[2], h.shape[3]), decoded


@pytest.fixture(scope="module")
def diffusers_dir(images, tmp_path_factory):
    model = vq_model(images)
    folder = tmp_path_factory.mktemp("diffusers") / "vqvae"
    model.save_pretrained(folder)
    return model, folder


@pytest.fixture(scope="module")
def imported(diffusers_dir, tmp_path_factory):
    """The test VQModel imported by the command line: the model directory the command tests run on."""
    out = tmp_path_factory.mktemp("imported") / "model"
    result = invoke("import", "diffusers", diffusers_dir[1], out)
    assert result.exit_code == 0, result.output
    return out


def assert_same_as_reference(tokenizer, codes, reference_codes, reference_images):
    assert torch.equal(codes, reference_codes)
    assert len(codes.unique()) > 16  # the comparison covers many codes, not one
    with torch.no_grad():
        raw = tokenizer.decode_latent(tokenizer.quantizer.lookup(codes))
    assert torch.allclose(raw, reference_images, atol=1e-4, rtol=0)
    assert torch.allclose(tokenizer.decode(codes), ((reference_images + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)


def test_diffusers_codes_and_images_are_vqmodels(diffusers_dir, imported, images):
    model, folder = diffusers_dir
    tokenizer = load_tokenizer(imported)
    assert tokenizer.FAMILY == "vqgan" and tokenizer.stride == 2 and tokenizer.codebook_size == 64
    config = tokenizer.config
    assert config.base_channels == 32 and config.channel_mult == (1, 2) and config.num_res_blocks == 1
    assert config.attn_levels == (1,) and config.z_channels == 4 and config.quantizer.code_dim == 4
    assert config.quantizer.normalize_codes is False and config.image_size == 256  # not sample_size: see importers.py
    weights = folder / "diffusion_pytorch_model.safetensors"
    assert tokenizer.source == {
        "format": "diffusers",
        "file": weights.name,
        "sha256": hashlib.sha256(weights.read_bytes()).hexdigest(),
    }
    assert_same_as_reference(tokenizer, tokenizer.encode(images), *vq_model_reference(model, images))


def test_a_vqmodel_without_middle_attention_is_imported_exactly(images, tmp_path):
    """aMUSEd's VQModel has no attention in its middle blocks; vqtok's network always has one, imported as an
    attention block that returns its input."""
    model = vq_model(images, mid_attention=False, seed=3)
    model.save_pretrained(tmp_path / "vqvae")
    result = invoke("import", "diffusers", tmp_path / "vqvae", tmp_path / "model")
    assert result.exit_code == 0, result.output
    tokenizer = load_tokenizer(tmp_path / "model")
    assert_same_as_reference(tokenizer, tokenizer.encode(images), *vq_model_reference(model, images))


def test_older_attention_names_and_a_bin_file_give_the_same_model(diffusers_dir, imported, tmp_path):
    """Checkpoints saved by older diffusers name attention query/key/value/proj_attn, and some repositories hold
    diffusion_pytorch_model.bin only (CompVis/ldm-celebahq-256's vqvae)."""
    _, folder = diffusers_dir
    old_names = {".to_q.": ".query.", ".to_k.": ".key.", ".to_v.": ".value.", ".to_out.0.": ".proj_attn."}
    state = {}
    for name, tensor in load_file(folder / "diffusion_pytorch_model.safetensors").items():
        for new, old in old_names.items():
            name = name.replace(new, old)
        state[name] = tensor
    assert any(".query." in name for name in state)
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((folder / "config.json").read_text())
    torch.save(state, old / "diffusion_pytorch_model.bin")
    result = invoke("import", "diffusers", old, tmp_path / "model")
    assert result.exit_code == 0, result.output
    assert load_tokenizer(tmp_path / "model").model_id == load_tokenizer(imported).model_id


def test_vqmodel_defaults_are_diffusers():
    from diffusers import VQModel

    parameters = inspect.signature(VQModel.__init__).parameters
    assert {name: parameters[name].default for name in VQMODEL_DEFAULTS} == {
        name: tuple(value) if isinstance(value, list) else value for name, value in VQMODEL_DEFAULTS.items()
    }


@pytest.mark.parametrize(
    "change, message",
    [
        ({"norm_type": "spatial"}, "norm_type 'spatial' means a decoder normalized by the quantized latents"),
        ({"norm_num_groups": 16}, "norm_num_groups 16 means GroupNorm with other than 32 groups"),
        ({"act_fn": "relu"}, "act_fn 'relu' means another activation than swish"),
        ({"down_block_types": ["DownBlock2D", "AttnDownEncoderBlock2D"]}, "DownBlock2D blocks"),
        ({"up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D"]}, "attention at other levels of the decoder"),
        ({"block_out_channels": [64, 96]}, "widths that are not multiples of the first, 64"),
        ({"_class_name": "AutoencoderKL"}, "describes a diffusers AutoencoderKL, not a VQModel"),
    ],
)
def test_a_vqmodel_vqtok_cannot_build_is_refused_in_one_line(diffusers_dir, tmp_path, change, message):
    _, folder = diffusers_dir
    source = tmp_path / "vqvae"
    source.mkdir()
    (source / "config.json").write_text(json.dumps({**json.loads((folder / "config.json").read_text()), **change}))
    (source / "diffusion_pytorch_model.safetensors").write_bytes(
        (folder / "diffusion_pytorch_model.safetensors").read_bytes()
    )
    line = one_line_error(invoke("import", "diffusers", source, tmp_path / "model"))
    assert message in line
    assert not (tmp_path / "model").exists()


def test_the_folder_above_a_vqmodel_names_the_folder_that_holds_it(diffusers_dir, tmp_path):
    """A pipeline's download (hf download amused/amused-256 vqvae/... --local-dir ROOT) keeps its VQModel in
    ROOT/vqvae, beside the other models' folders: importing ROOT says which folder to import."""
    root = tmp_path / "amused-256"
    shutil.copytree(diffusers_dir[1], root / "vqvae")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text(json.dumps({"architectures": ["CLIPTextModelWithProjection"]}))
    (root / "model_index.json").write_text(
        json.dumps({"_class_name": "AmusedPipeline", "vqvae": ["diffusers", "VQModel"]})
    )
    line = one_line_error(invoke("import", "diffusers", root, tmp_path / "model"))
    assert line == f"Error: {root} is not a VQModel folder: it holds no config.json; did you mean {root / 'vqvae'}?"
    line = one_line_error(invoke("import", "diffusers", tmp_path, tmp_path / "model"))
    assert line == f"Error: {tmp_path} is not a VQModel folder: it holds no config.json"
    assert not (tmp_path / "model").exists()


def test_a_vqmodel_state_dict_that_does_not_match_its_config_names_the_key(diffusers_dir, tmp_path):
    _, folder = diffusers_dir
    state = load_file(folder / "diffusion_pytorch_model.safetensors")
    source = tmp_path / "vqvae"
    source.mkdir()
    (source / "config.json").write_text((folder / "config.json").read_text())
    del state["decoder.up_blocks.0.attentions.1.to_v.bias"]
    state["encoder.extra.weight"] = torch.zeros(1)
    save_file(state, source / "diffusion_pytorch_model.safetensors")
    line = one_line_error(invoke("import", "diffusers", source, tmp_path / "model"))
    # diffusers' up_blocks.0 is the last level, taming's up.1
    assert "does not match its config: missing key decoder.up.1.attn.1.v.bias (and 1 more problems)" in line


# ----------------------------------------------------------------------------------------------- LlamaGen


@pytest.fixture(scope="module")
def llamagen_images():
    return torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("ch_mult, stride", [((1, 2, 2, 4), 8), ((1, 1, 2, 2, 4), 16)], ids=["VQ-8", "VQ-16"])
def test_llamagen_imports_with_no_option_and_matches_its_forward(ch_mult, stride, llamagen_images, tmp_path):
    model = llamagen_vq(ch_mult, llamagen_images)
    state = model.state_dict()
    torch.save({"model": state}, tmp_path / "vq_ds.pt")  # as LlamaGen's vq_train.py saves, its other entries aside
    result = invoke("import", "llamagen", tmp_path / "vq_ds.pt", tmp_path / "model")
    assert result.exit_code == 0, result.output

    tokenizer = load_tokenizer(tmp_path / "model")
    config = tokenizer.config
    quantizer = config.quantizer
    assert (quantizer.codebook_size, quantizer.code_dim, quantizer.normalize_codes) == (64, 8, True)
    assert tokenizer.stride == stride and config.channel_mult == ch_mult and config.base_channels == 32
    assert config.attn_levels == (len(ch_mult) - 1,) and config.num_res_blocks == 2 and config.image_size == 256

    # every LlamaGen tensor but the usage record is in the model, and nothing else is: the same multiset of tensors
    ours = tokenizer.state_dict()
    statistics = {f"quantizer.{name}" for name, _ in tokenizer.quantizer.named_buffers() if name != "codebook"}
    theirs = sorted(
        (tuple(t.shape), t.double().sum().item()) for n, t in state.items() if n != "quantize.codebook_used"
    )
    assert theirs == sorted((tuple(t.shape), t.double().sum().item()) for n, t in ours.items() if n not in statistics)

    with torch.no_grad():
        expected = model.encode(llamagen_images * 2 - 1)
        reference = model.decode_code(expected)
    codes = tokenizer.encode(llamagen_images)
    assert codes.shape == (6, 32 // stride, 32 // stride)
    assert torch.equal(codes, expected)
    assert len(codes.unique()) > 4
    assert torch.allclose(tokenizer.decode(codes), ((reference + 1) / 2).clamp(0, 1), atol=1e-4, rtol=0)


def test_llamagen_normalization_is_an_option(llamagen_images, tmp_path):
    torch.save({"model": llamagen_vq((1, 2), llamagen_images).state_dict()}, tmp_path / "vq.pt")
    result = invoke("import", "llamagen", tmp_path / "vq.pt", tmp_path / "model", "--no-normalize-codes")
    assert result.exit_code == 0, result.output
    assert load_tokenizer(tmp_path / "model").config.quantizer.normalize_codes is False


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda state: state.pop("decoder.conv_blocks.0.attn.1.proj_out.bias"), "missing key decoder.up.1.attn.1"),
        (lambda state: state.update({"encoder.extra.weight": torch.zeros(2)}), "unexpected key encoder.extra.weight"),
        (lambda state: state.pop("quantize.embedding.weight"), "it has no quantize.embedding.weight"),
    ],
    ids=["missing", "unexpected", "no codebook"],
)
def test_a_llamagen_state_dict_that_does_not_match_is_refused_in_one_line(llamagen_images, tmp_path, edit, message):
    state = llamagen_vq((1, 2), llamagen_images).state_dict()
    edit(state)
    torch.save({"model": state}, tmp_path / "vq.pt")
    assert message in one_line_error(invoke("import", "llamagen", tmp_path / "vq.pt", tmp_path / "model"))
    assert not (tmp_path / "model").exists()


def write_llamagen_training_checkpoint(path, model, discriminator: dict, **entries):
    """A checkpoint as LlamaGen's vq_train.py saves one every --ckpt-every steps: the model's and the
    discriminator's state dicts, their Adam states, the step, and its argparse arguments (which need pickle)."""
    optimizers = {}
    for name, parameters in (("optimizer", model.parameters()), ("optimizer_disc", discriminator.parameters())):
        optimizer = torch.optim.Adam(parameters, lr=1e-4, betas=(0.9, 0.95))
        optimizers[name] = optimizer.state_dict()
    checkpoint = {
        "model": model.state_dict(),
        "discriminator": discriminator.state_dict(),
        **optimizers,
        "steps": 10000,
        "args": argparse.Namespace(vq_model="VQ-16", disc_type="patchgan", disc_dim=64),
    }
    torch.save({**checkpoint, **entries}, path)


def test_llamagen_training_checkpoint_keeps_its_discriminator(llamagen_images, tmp_path):
    model = llamagen_vq((1, 2), llamagen_images)
    discriminator = taming_discriminator(seed=4, filters=8, layers=2)
    write_llamagen_training_checkpoint(tmp_path / "0010000.pt", model, discriminator)
    torch.save({"model": model.state_dict()}, tmp_path / "released.pt")  # what vq_ds16_c2i.pt holds
    line = one_line_error(invoke("import", "llamagen", tmp_path / "0010000.pt", tmp_path / "model"))
    assert "argparse.Namespace" in line and "--trust-pickle" in line
    result = invoke("import", "llamagen", tmp_path / "0010000.pt", tmp_path / "model", "--trust-pickle")
    assert result.exit_code == 0, result.output
    assert invoke("import", "llamagen", tmp_path / "released.pt", tmp_path / "released").exit_code == 0

    shape, state = read_discriminator(tmp_path / "model")
    assert shape == {"in_channels": 3, "filters": 8, "layers": 2}
    theirs = discriminator.state_dict()
    assert state.keys() == theirs.keys()
    for name, tensor in theirs.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name
    assert read_discriminator(tmp_path / "released") is None
    tokenizer, released = load_tokenizer(tmp_path / "model"), load_tokenizer(tmp_path / "released")
    assert (tokenizer.model_id, tokenizer.codes_id) == (released.model_id, released.codes_id)

    summary = json.loads(invoke("info", tmp_path / "model", "--json").output)
    assert {name: summary["discriminator"][name] for name in shape} == shape
    table = CliRunner().invoke(cli, ["info", str(tmp_path / "model")], env={"COLUMNS": "200"})
    assert "PatchGAN, 2 layers, 8 filters, 3 input channels" in table.output, table.output


@pytest.mark.parametrize(
    "discriminator, message",
    [
        (  # vq_train.py --disc-type stylegan: discriminator_stylegan.py's network, another one altogether
            {
                "blocks.0.weight": torch.zeros(64, 3, 3, 3),
                "blocks.2.conv_res.weight": torch.zeros(64, 64, 1, 1),
                "final_linear.2.weight": torch.zeros(1, 512),
            },
            "its 'discriminator' is not a PatchGAN discriminator: it has no 4-d main.0.weight",
        ),
        ({"main.0.weight": torch.zeros(8, 3, 4, 4)}, "missing key main.0.bias (and 8 more problems)"),
        ([torch.zeros(1)], "its 'discriminator' holds a list, not a state dict"),
    ],
    ids=["stylegan", "partial", "no state dict"],
)
def test_a_llamagen_discriminator_that_does_not_fit_is_refused_in_one_line(
    llamagen_images, tmp_path, discriminator, message
):
    torch.save(
        {"model": llamagen_vq((1, 2), llamagen_images).state_dict(), "discriminator": discriminator}, tmp_path / "vq.pt"
    )
    line = one_line_error(invoke("import", "llamagen", tmp_path / "vq.pt", tmp_path / "model"))
    assert f"{tmp_path / 'vq.pt'}: " in line and message in line
    assert not (tmp_path / "model").exists()


# ------------------------------------------------------------------------------ every command, imported model


def expected_codes(model_dir, samples) -> dict:
    """{key: codes} from the tokenizer's Python API on the images as vqtok's readers preprocess them."""
    tokenizer = load_tokenizer(model_dir)
    samples = list(samples)
    images = torch.stack([sample_image(s, SIZE) for s in samples]).float() / 255
    return {s.key: grid.tolist() for s, grid in zip(samples, tokenizer.encode(images), strict=True)}


def token_dict(path) -> dict:
    keys, codes = read_codes(path)
    return {key: grid.tolist() for key, grid in zip(keys, codes, strict=True)}


@pytest.fixture
def shards(make_shard):
    return [
        make_shard("a.tar", image_samples([f"a{i}" for i in range(5)], seed=0)),
        make_shard("b.tar", image_samples([f"b{i}" for i in range(4)], seed=40)),
    ]


def test_encode_shards_then_decode(imported, shards, tmp_path):
    tokens = tmp_path / "tokens.parquet"
    result = invoke("encode", *shards, tokens, "--model", imported, "--image-size", SIZE, "--num-workers", "0")
    assert result.exit_code == 0, result.output
    expected = {}
    for shard in shards:
        expected |= expected_codes(imported, iter_samples(shard))
    assert token_dict(tokens) == expected

    decoded = invoke("decode", tokens, tmp_path / "images", "--model", imported)
    assert decoded.exit_code == 0, decoded.output
    keys, codes = read_codes(tokens)
    pixels = load_tokenizer(imported).decode(torch.from_numpy(codes.astype(np.int64)))
    pixels = (pixels * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for key, image in zip(keys, pixels, strict=True):
        assert np.array_equal(np.asarray(Image.open(tmp_path / "images" / f"{key}.png")), image)


def test_encode_an_image_folder_and_a_parquet_dataset(imported, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    images = class_images(per_class=3)
    folder = write_image_folder(tmp_path / "folder", images)
    parquet = write_hf_parquet(tmp_path / "hf", images)
    shard = tmp_path / "same.tar"
    write_shard(shard, [{"__key__": key, "png": data} for key, data in images.items()])
    expected = expected_codes(imported, iter_samples(str(shard)))
    for source in (folder, parquet):
        out = tmp_path / f"{source.name}.parquet"
        result = invoke("encode", source, out, "--model", imported, "--image-size", SIZE, "--num-workers", "0")
        assert result.exit_code == 0, result.output
        assert token_dict(out) == expected


def test_eval_reports_the_reconstructions(imported, shards):
    result = invoke("eval", imported, *shards, "--json", "--image-size", SIZE, "--num-workers", "0")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    tokenizer = load_tokenizer(imported)
    x = torch.stack([sample_image(s, SIZE) for shard in shards for s in iter_samples(shard)]).float() / 255
    codes = tokenizer.encode(x)
    mse = (tokenizer.decode(codes) - x).pow(2).flatten(1).mean(dim=1).double().mean().item()
    assert report["images"] == 9 and report["errors"] == 0
    assert report["psnr"] == pytest.approx(10 * np.log10(1 / mse), abs=1e-4)
    assert report["codes_used"] == len(codes.unique())


def test_info_shows_the_family_and_where_the_model_came_from(imported, diffusers_dir):
    weights = diffusers_dir[1] / "diffusion_pytorch_model.safetensors"
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    result = invoke("info", imported, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["family"] == "vqgan" and summary["codebook_size"] == 64
    assert summary["source"] == {"format": "diffusers", "file": weights.name, "sha256": sha}
    table = CliRunner().invoke(cli, ["info", str(imported)], env={"COLUMNS": "200"})  # one line per row
    assert table.exit_code == 0 and "vqgan" in table.output
    assert "diffusion_pytorch_model.safetensors (diffusers)" in table.output and sha in table.output


def test_prior_fit_sample_and_decode(imported, tmp_path, make_shard):
    shard = make_shard("c.tar", image_samples([f"c{i}" for i in range(24)], seed=7))
    tokens = tmp_path / "tokens.parquet"
    result = invoke(
        "encode", shard, tokens, "--model", imported, "--image-size", SIZE, "--keep", "cls", "--num-workers", "0"
    )
    assert result.exit_code == 0, result.output
    run = tmp_path / "prior"
    tiny = ["--layers", "1", "--width", "32", "--heads", "2", "--batch-size", "8", "--num-workers", "0"]
    fitted = invoke("prior", "fit", tokens, "--out", run, *tiny, "--steps", "2", "--tokenizer", imported)
    assert fitted.exit_code == 0, fitted.output
    samples = tmp_path / "samples.parquet"
    sampled = invoke("prior", "sample", run, samples, "--n", "3", "--seed", "1")
    assert sampled.exit_code == 0, sampled.output
    keys, codes = read_codes(samples)
    assert codes.shape == (3, SIZE // 2, SIZE // 2) and codes.max() < 64
    decoded = invoke("decode", samples, tmp_path / "images", "--model", imported)
    assert decoded.exit_code == 0, decoded.output
    for key in keys:
        assert Image.open(tmp_path / "images" / f"{key}.png").size == (SIZE, SIZE)


def test_import_from_and_encode_in_a_bucket(bucket, diffusers_dir, imported, make_shard, tmp_path):
    """A VQModel directory read from a store (the code path of hf:// paths) into a model in the store, which
    encodes shards in the store."""
    bucket.fs.put(f"{diffusers_dir[1]}/", f"{bucket.name}/vqvae/", recursive=True)
    result = invoke("import", "diffusers", bucket.url("vqvae"), bucket.url("models/x"))
    assert result.exit_code == 0, result.output
    shard = make_shard("d.tar", image_samples([f"d{i}" for i in range(4)], seed=9))
    bucket.fs.put_file(shard, f"{bucket.name}/shards/d.tar")
    tokens = bucket.url("tokens.parquet")
    args = ["--model", bucket.url("models/x"), "--image-size", SIZE, "--num-workers", "0"]
    result = invoke("encode", bucket.url("shards/"), tokens, *args)
    assert result.exit_code == 0, result.output
    assert token_dict(tokens) == expected_codes(imported, iter_samples(shard))
    assert load_tokenizer(bucket.url("models/x")).model_id == load_tokenizer(imported).model_id
