"""The README and docs say what the code does: the command reference is `--help`, and their commands run.

`python tests/test_docs.py` rewrites docs/commands.md from the commands' `--help`.
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from vqtok.cli import cli

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
COMMANDS = ("fit", "eval", "encode", "prior fit", "prior sample", "decode", "info", "import", "demo")
# Long runs are not run as written here: training for thousands of steps would take hours on CI. The docs show
# their output (docs/index.md), and tests/test_fit.py, tests/test_prior.py and tests/test_demo.py run the same
# commands small.
LONG = ("vqtok fit", "vqtok demo", "vqtok prior fit")


def help_text(command: str) -> str:
    result = CliRunner().invoke(cli, [*command.split(), "--help"], prog_name="vqtok", terminal_width=100)
    assert result.exit_code == 0, result.output
    return result.output.rstrip()


def commands_md() -> str:
    parts = [
        "# Command reference\n",
        "Every command and option, as `vqtok COMMAND --help` prints it. Written by `python tests/test_docs.py`;",
        "a test checks that it still matches the code.\n",
    ]
    for command in COMMANDS:
        parts += [f"## vqtok {command}\n", "```text", help_text(command), "```\n"]
    return "\n".join(parts)


def test_command_reference_matches_help():
    assert (ROOT / "docs" / "commands.md").read_text() == commands_md(), "run: python tests/test_docs.py"


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"^```{language}\n(.*?)^```", path.read_text(), flags=re.M | re.S)


def shell_lines(path: Path, program: str = "vqtok") -> list[str]:
    lines = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #", 1)[0].strip()  # drop trailing comments
            if line.startswith(f"{program} "):
                lines.append(line)
    return lines


def test_downloads_use_the_command_huggingface_hub_installs():
    """huggingface_hub installs `hf`, no longer `huggingface-cli`: every download line, in a bash block or inline,
    is `hf download` with options that its --help lists."""
    downloads = []
    for path in DOCS:
        text = path.read_text()
        assert "huggingface-cli" not in text, path.name
        inline = (" ".join(code.split()) for code in re.findall(r"`(hf download [^`]+)`", text))
        downloads += [*shell_lines(path, "hf"), *inline]
    hf = shutil.which("hf", path=os.path.dirname(sys.executable))
    offline = {**os.environ, "HF_HUB_OFFLINE": "1"}
    usage = subprocess.run([hf, "download", "--help"], env=offline, capture_output=True, text=True, check=True).stdout
    assert len(downloads) >= 5
    for line in downloads:
        args = shlex.split(line)
        assert args[1] == "download", line
        assert all(option in usage for option in args if option.startswith("--")), line


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, model_dir):
    """What the documented commands expect in their folder: shards/ (train and val), runs/x/model, tokens.parquet,
    my-photos/ and my-photos-val/ (image folders), samples.parquet, a prior in runs/p/model with its samples in sampled.parquet, an ImageNet-style imagenet/
    (train/<class>/<file>.JPEG, val/<file>.JPEG) and Hugging Face's CIFAR-10 layout
    (cifar10/plain_text/train-*.parquet with `img` and `label`)."""
    import torch
    from conftest import class_images, image_bytes, image_samples, random_image, write_hf_parquet, write_shard

    from vqtok.config import PriorConfig
    from vqtok.encode import encode
    from vqtok.pretrained import read_header
    from vqtok.prior import Prior
    from vqtok.prior.sample import sample
    from vqtok.tokenizers.importers import import_model

    root = tmp_path_factory.mktemp("docs")
    (root / "shards").mkdir()
    for i in range(100):
        samples = image_samples([f"img{i:03d}"], seed=i)
        samples[0]["txt"] = f"a caption for image {i}".encode()
        write_shard(root / "shards" / f"train-{i:06d}.tar", samples)
    for i in range(10):
        write_shard(root / "shards" / f"val-{i:06d}.tar", image_samples([f"val{i:03d}"], seed=1000 + i))
    shutil.copytree(model_dir, root / "runs" / "x" / "model")
    shutil.copytree(model_dir, root / "runs" / "y" / "model")  # a second tokenizer for `vqtok eval --compare`
    encode([str(root / "shards")], root / "tokens.parquet", root / "runs/x/model", keep=["cls", "txt"], num_workers=0)
    codes = np.random.default_rng(0).integers(0, 32, (3, 4, 4))
    pd.DataFrame({"key": ["s0", "s1", "s2"], "codes": [[list(r) for r in g] for g in codes]}).to_parquet(
        root / "samples.parquet"
    )
    torch.manual_seed(0)
    tokenizer = read_header(model_dir)
    small = {"layers": 1, "width": 16, "heads": 2, "codebook_size": 32, "grid": (4, 4), "image_size": 16}
    Prior(PriorConfig(num_classes=4, tokenizer=tokenizer["model_id"], **small)).save_pretrained(root / "runs/p/model")
    sample(root / "runs/p/model", root / "sampled.parquet", n=8, show_progress=False)
    for key in ["n01440764/n01440764_10026", "n01440764/n01440764_10027", "n01443537/n01443537_1000"]:
        (root / "imagenet" / "train" / key).parent.mkdir(parents=True, exist_ok=True)
        (root / "imagenet" / "train" / f"{key}.JPEG").write_bytes(image_bytes(random_image(len(key)), "JPEG"))
    (root / "imagenet" / "val").mkdir()
    for i in range(3):
        (root / "imagenet" / "val" / f"ILSVRC2012_val_{i:08d}.JPEG").write_bytes(image_bytes(random_image(i), "JPEG"))
    cifar = class_images(("airplane", "cat"), per_class=2, seed=7)
    write_hf_parquet(root / "cifar10", cifar, files=1, key_column=None, image_column="img", folder="plain_text")
    downloaded_checkpoints(root / "checkpoints")
    import_model("llamagen", root / "checkpoints" / "vq_ds16_c2i.pt", root / "runs" / "llamagen" / "model")
    three = [str(root / "shards" / f"train-{i:06d}.tar") for i in range(3)]  # as docs/pretrained.md encodes
    encode(three, root / "llamagen.parquet", root / "runs" / "llamagen" / "model", keep=["cls"], num_workers=0)
    # docs/training.md's own photographs, and its fine-tune of the LlamaGen model (whose `vqtok fit` is long: the
    # imported model stands in for what it exports)
    for folder, count in (("my-photos", 4), ("my-photos-val", 2)):
        (root / folder).mkdir()
        for i in range(count):
            (root / folder / f"{i}.jpg").write_bytes(image_bytes(random_image(100 + i), "JPEG"))
    shutil.copytree(root / "runs" / "llamagen" / "model", root / "runs" / "vq16-mine" / "model")
    return root


def downloaded_checkpoints(folder):
    """What docs/pretrained.md downloads, where it puts it: checkpoints of the same formats and key names, of
    tiny networks with random weights (tests/test_import_reference.py checks these formats against their
    reference code)."""
    import torch
    import yaml
    from conftest import TAMING_DDCONFIG, TAMING_EMBED_DIM, TAMING_N_EMBED, llamagen_vq, taming_vqgan, vq_model

    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    folder.mkdir()
    for name, ch_mult in (("vq_ds16_c2i.pt", (1, 1, 2, 2, 4)), ("vq_ds8_c2i.pt", (1, 2, 2, 4))):
        torch.save({"model": llamagen_vq(ch_mult, images).state_dict()}, folder / name)
    vq_model(images, mid_attention=False).save_pretrained(folder / "amused-256" / "vqvae")
    vq_model(images).save_pretrained(folder / "ldm-celebahq-256" / "vqvae", safe_serialization=False)  # a .bin
    taming = folder / "vqgan_imagenet_f16_16384"
    taming.mkdir()
    torch.save({"state_dict": taming_vqgan(images).state_dict()}, taming / "last.ckpt")
    params = {"embed_dim": TAMING_EMBED_DIM, "n_embed": TAMING_N_EMBED, "ddconfig": TAMING_DDCONFIG}
    (taming / "model.yaml").write_text(yaml.safe_dump({"model": {"params": params}}))


@pytest.fixture
def bucket_for_docs(request, workspace, monkeypatch, tmp_path):
    """s3://my-bucket on the local S3 server, holding what the documented commands read there: shards/ (ten of
    them), runs/x/model and tokens.parquet."""
    import s3fs
    from conftest import point_at_s3

    point_at_s3(monkeypatch, request.getfixturevalue("s3_endpoint"), tmp_path)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    if not fs.exists("my-bucket"):
        fs.mkdir("my-bucket")
        fs.put(f"{workspace / 'runs/x/model'}/", "my-bucket/runs/x/model/", recursive=True)
        for shard in sorted((workspace / "shards").glob("train-00000*.tar")):  # ten: the S3 path, not the count
            fs.put_file(str(shard), f"my-bucket/shards/{shard.name}")
    if not fs.exists("my-bucket/tokens.parquet/_SUCCESS"):
        fs.put(f"{workspace / 'tokens.parquet'}/", "my-bucket/tokens.parquet/", recursive=True)
    return fs


def documented(kind: str) -> list:
    found = []
    for path in DOCS:
        if kind == "bash":
            lines = [line for line in shell_lines(path) if not line.startswith(LONG)]
            found += [pytest.param(line, id=f"{path.name}: {line}") for line in lines]
        else:
            found += [pytest.param(code, id=f"{path.name}: python {i}") for i, code in enumerate(blocks(path, kind))]
    return found


def test_long_commands_are_shown_with_their_output():
    guide = (ROOT / "docs" / "index.md").read_text()
    for command in LONG:
        assert f"$ {command}" in guide, f"docs/index.md shows no run of {command} with its output"


@pytest.mark.parametrize("line", documented("bash"))
def test_documented_command_runs_as_written(line, workspace, tmp_path, monkeypatch, request):
    run_dir = tmp_path / "run"
    shutil.copytree(workspace, run_dir)
    encode = " encode " in f" {line} "
    if encode:
        shutil.rmtree(run_dir / "tokens.parquet")  # an encode starts a dataset of its own
    if " prior sample " in f" {line} ":
        shutil.rmtree(run_dir / "sampled.parquet")  # and so does a sampling run
    args = shlex.split(line)[1:]
    if args[0] == "import":
        shutil.rmtree(run_dir / args[3], ignore_errors=True)  # an import writes a model directory of its own
    if "s3://" in line:  # against the local S3 server, as a user with AWS_ENDPOINT_URL set runs it
        fs = request.getfixturevalue("bucket_for_docs")
        if encode and fs.exists("my-bucket/tokens.parquet"):
            fs.rm("my-bucket/tokens.parquet", recursive=True)
    monkeypatch.chdir(run_dir)
    result = CliRunner().invoke(cli, args, prog_name="vqtok")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("code", documented("python"))
def test_documented_python_runs_as_written(code, workspace, tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    shutil.copytree(workspace, run_dir)
    monkeypatch.chdir(run_dir)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    exec(compile(code, "<docs>", "exec"), {"__name__": "docs"})


if __name__ == "__main__":
    (ROOT / "docs" / "commands.md").write_text(commands_md())
    print("wrote docs/commands.md", file=sys.stderr)
