"""Builders shared by the tests: WebDataset shards, image folders, Parquet datasets and encoded images, made on
the spot in tmp_path; and a local S3 server (moto) on 127.0.0.1 for the tests of object storage."""

import contextlib
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import webdataset
from PIL import Image
from torch import nn


def image_bytes(image, fmt: str = "PNG", **save_options) -> bytes:
    """A PIL image or a uint8/uint16 array ((H, W) or (H, W, C)) -> the bytes of an image file."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save_options)
    return buffer.getvalue()


def random_image(seed: int, height: int = 24, width: int = 32) -> np.ndarray:
    """A (H, W, 3) uint8 array of noise, different for each seed."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_shard(path, samples: list[dict]) -> str:
    """Write samples as a WebDataset tar: each a dict of "__key__" and extension -> bytes (or str, int)."""
    with webdataset.TarWriter(str(path)) as sink:
        for sample in samples:
            sink.write(sample)
    return str(path)


def image_samples(keys, seed: int = 0) -> list[dict]:
    """One PNG and a class label per key."""
    return [
        {"__key__": key, "png": image_bytes(random_image(seed + i)), "cls": str(i).encode()}
        for i, key in enumerate(keys)
    ]


def class_images(classes=("cat", "dog"), per_class: int = 3, seed: int = 0) -> dict[str, bytes]:
    """{key: PNG bytes} for keys `class/i`, the layout of an ImageNet-style folder."""
    images, n = {}, 0
    for name in classes:
        for i in range(per_class):
            images[f"{name}/{i}"] = image_bytes(random_image(seed + n))
            n += 1
    return images


def write_image_folder(root, images: dict[str, bytes], extension: str = "png") -> Path:
    """Each image as root/KEY.extension."""
    root = Path(root)
    for key, data in images.items():
        path = root / f"{key}.{extension}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def write_hf_parquet(
    root,
    images: dict[str, bytes],
    files: int = 2,
    key_column: str | None = "__key__",
    image_column: str = "image",
    folder: str = "data",
) -> Path:
    """A Hugging Face style Parquet dataset written by `datasets` itself: root/data/train-0000i-of-0000n.parquet,
    an Image() column, a ClassLabel `label` (the key's first folder) and a text `caption`."""
    import datasets

    keys = list(images)
    names = sorted({key.split("/")[0] for key in keys})
    columns = {
        image_column: [{"bytes": images[key], "path": f"{key}.png"} for key in keys],
        "label": [names.index(key.split("/")[0]) for key in keys],
        "caption": [f"a picture of {key}" for key in keys],
    }
    features = {
        image_column: datasets.Image(),
        "label": datasets.ClassLabel(names=names),
        "caption": datasets.Value("string"),
    }
    if key_column:
        columns[key_column] = keys
        features[key_column] = datasets.Value("string")
    dataset = datasets.Dataset.from_dict(columns, features=datasets.Features(features))
    (Path(root) / folder).mkdir(parents=True, exist_ok=True)
    for i in range(files):
        path = Path(root) / folder / f"train-{i:05d}-of-{files:05d}.parquet"
        dataset.shard(files, i, contiguous=True).to_parquet(str(path))
    return Path(root)


def write_path_only_parquet(path, paths: list[str], folder=None) -> str:
    """A Parquet file as `datasets` writes one locally from image files: an Image() column of {bytes: None,
    path}, the paths as given. `datasets` looks at the files as it writes, relative ones from `folder`."""
    import contextlib

    import datasets

    with contextlib.chdir(folder or os.getcwd()):
        dataset = datasets.Dataset.from_dict({"image": [str(p) for p in paths]})
        dataset.cast_column("image", datasets.Image()).to_parquet(str(path))
    return str(path)


def bomb_png(width: int, height: int) -> bytes:
    """A valid 1x1 PNG whose header claims width x height pixels."""
    data = bytearray(image_bytes(np.zeros((1, 1), np.uint8)))
    data[16:24] = struct.pack(">II", width, height)  # IHDR: length, "IHDR", then width and height
    data[29:33] = struct.pack(">I", zlib.crc32(data[12:29]))
    return bytes(data)


def bad_samples() -> list[dict]:
    """One sample of each kind that cannot become an image, keyed by what is wrong with it."""
    return [
        {"__key__": "truncated", "jpg": image_bytes(random_image(5, 64, 64), "JPEG")[:300]},
        {"__key__": "empty", "png": b""},
        {"__key__": "text", "jpg": b"hello"},
        {"__key__": "bomb", "png": bomb_png(30000, 30000)},
        {"__key__": "label-only", "cls": b"3"},
    ]


def broken_copy(path, cut=None, overwrite=None):
    """A copy of a shard cut at byte `cut`, or with 100 bytes of garbage written at `overwrite`."""
    data = bytearray(Path(path).read_bytes())
    if overwrite is not None:
        data[overwrite : overwrite + 100] = b"\xff" * 100
    broken = path.replace(".tar", "-broken.tar")
    Path(broken).write_bytes(bytes(data[:cut]))
    return broken


def free_port() -> int:
    """A TCP port nobody listens on now, for a launcher's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def checkpoint_files(processes: int) -> list[str]:
    """The files of a checkpoint that `processes` processes wrote (vqtok.checkpoints), sorted."""
    random_states = [f"rng-{rank}.{suffix}" for rank in range(processes) for suffix in ("json", "safetensors")]
    return sorted([*random_states, "state.json", "state.safetensors"])


def two_processes(*args) -> list[str]:
    """The command `accelerate launch --multi_gpu --num_processes 2 -m vqtok ARGS`: two processes on the CPU."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    return [*launch, "--main_process_port", str(free_port()), "-m", "vqtok", *map(str, args)]


def launch_two_processes(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `two_processes(*args)`."""
    return subprocess.run(two_processes(*args), capture_output=True, text=True, timeout=timeout)


def read_metrics(out: Path) -> list[dict]:
    """A run folder's metrics.jsonl."""
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def kill_after_checkpoint(command: list[str], out: Path, step: int, timeout: float = 120) -> int:
    """Run a training command, kill it with SIGKILL once its checkpoint of `step` is in OUT, and return the step of
    the latest checkpoint it left. Every process of the run is killed, found as the command's descendants
    (psutil, which accelerate depends on): torchrun starts each worker in a session of its own, out of reach of
    a signal to the launcher's process group."""
    import psutil

    run = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not (out / "checkpoints" / f"step-{step:06d}").is_dir():
        assert run.poll() is None and time.monotonic() < deadline, f"the run ended before its checkpoint of {step}"
        time.sleep(0.02)
    launcher = psutil.Process(run.pid)
    processes = [launcher, *launcher.children(recursive=True)]
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(processes, timeout=60)
    run.wait()
    return max(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-??????"))


def kill_and_resume(command: list[str], out: Path, steps: int, change: list[str], changed: str) -> None:
    """Run a training command of `steps` steps that saves a checkpoint every 5, kill it (SIGKILL, its whole
    process group) after its second checkpoint, and check that it resumes from the last one: the same command
    without --resume and with --resume plus the `change` option are refused, with --resume it finishes."""
    killed_at = kill_after_checkpoint(command, out, 10)
    assert 10 <= killed_at < steps

    refused = subprocess.run(command, capture_output=True, text=True)
    assert refused.returncode == 1 and "--resume" in refused.stderr
    other = subprocess.run([*command, "--resume", *change], capture_output=True, text=True)
    assert other.returncode == 1 and f"{changed} changed" in other.stderr

    resumed = subprocess.run([*command, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics if "resumed_from" in m] == [0, killed_at]  # not from step 0 again
    assert [m["step"] for m in metrics if "loss" in m][-1] == steps


def write_recipe(path, tables: dict[str, dict]) -> Path:
    """A TOML recipe of tables {"model": {...}, ...} whose values are numbers, strings, booleans or lists of them."""

    def value(v) -> str:
        return ("true" if v else "false") if isinstance(v, bool) else json.dumps(v)

    lines = []
    for name, table in tables.items():
        lines += [f"[{name}]", *(f"{key} = {value(v)}" for key, v in table.items()), ""]
    Path(path).write_text("\n".join(lines))
    return Path(path)


@pytest.fixture
def offline_datasets(tmp_path, monkeypatch):
    """Hugging Face `datasets` with a cache of its own and no network."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def make_shard(tmp_path):
    """make_shard(name, samples) -> the path of a shard written in tmp_path."""

    def make(name: str, samples: list[dict]) -> str:
        return write_shard(tmp_path / name, samples)

    return make


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A small untrained model whose codebook is spread over its encoder's outputs, so codes vary."""
    import torch

    from vqtok import VQVAE, ModelConfig, QuantizerConfig

    torch.manual_seed(0)
    model = VQVAE(
        ModelConfig(hidden_channels=8, image_size=16, quantizer=QuantizerConfig(codebook_size=32, code_dim=4))
    )
    with torch.no_grad():
        z = model.encoder(torch.rand(8, 3, 16, 16) * 2 - 1)  # (8, D, 4, 4)
        model.quantizer.codebook.copy_(z.permute(0, 2, 3, 1).reshape(-1, 4)[torch.randperm(128)[:32]])
    return str(model.save_pretrained(tmp_path_factory.mktemp("model") / "model"))


# taming-transformers' ddconfig for a tiny two-level VQGAN, attention at the lowest resolution (16 px of 32)
TAMING_DDCONFIG = dict(
    ch=32,
    out_ch=3,
    ch_mult=[1, 2],
    num_res_blocks=2,
    attn_resolutions=[16],
    dropout=0.0,
    in_channels=3,
    resolution=32,
    z_channels=16,
    double_z=False,
)
TAMING_N_EMBED, TAMING_EMBED_DIM = 64, 8


def taming_vqgan(images, seed: int = 0):
    """The modules of taming-transformers' VQModel (taming/models/vqgan.py) under its attribute names, losses
    left out, with random weights (GroupNorm's too) and codes drawn from the latents of `images` (B, 3, 32, 32) in
    [0, 1], so that many codes are in use."""
    import torch
    from taming.modules.diffusionmodules.model import Decoder, Encoder
    from taming.modules.vqvae.quantize import VectorQuantizer

    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.encoder = Encoder(**TAMING_DDCONFIG)
    model.decoder = Decoder(**TAMING_DDCONFIG)
    model.quantize = VectorQuantizer(TAMING_N_EMBED, TAMING_EMBED_DIM, beta=0.25)
    model.quant_conv = torch.nn.Conv2d(TAMING_DDCONFIG["z_channels"], TAMING_EMBED_DIM, 1)
    model.post_quant_conv = torch.nn.Conv2d(TAMING_EMBED_DIM, TAMING_DDCONFIG["z_channels"], 1)
    model.eval()
    with torch.no_grad():
        for module in model.modules():  # GroupNorm starts as the identity: make its affine part count too
            if isinstance(module, torch.nn.GroupNorm):
                module.weight.normal_(1, 0.2)
                module.bias.normal_(0, 0.2)
        z = model.quant_conv(model.encoder(images * 2 - 1)).permute(0, 2, 3, 1).reshape(-1, TAMING_EMBED_DIM)
        picks = z[torch.randperm(z.shape[0])[:TAMING_N_EMBED]]
        model.quantize.embedding.weight.copy_(picks + 0.01 * torch.randn_like(picks))
    return model


def taming_reference(model, images):
    """What taming's own modules make of images (B, 3, H, W) in [0, 1]: (codes (B, h, w), decoded images in
    about [-1, 1]), as VQModel.encode and VQModel.decode compute them."""
    import torch

    with torch.no_grad():
        z_q, _, (_, _, indices) = model.quantize(model.quant_conv(model.encoder(images * 2 - 1)))
        decoded = model.decoder(model.post_quant_conv(z_q))
    B, _, h, w = z_q.shape
    return indices.view(B, h, w), decoded


# diffusers' VQModel and LlamaGen's VQModel, small, for `vqtok import` (tests/test_import_reference.py, docs)


def randomize_norms(model: nn.Module) -> None:
    """GroupNorm starts as the identity: make its affine part count too."""
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.weight.normal_(1, 0.2)
            module.bias.normal_(0, 0.2)


def vq_model(images, mid_attention=True, seed=0):
    """A small diffusers VQModel, attention in its second level, with random weights and a codebook drawn from
    its latents of `images` so that many codes are in use."""
    from diffusers import VQModel

    torch.manual_seed(seed)
    model = VQModel(
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D", "AttnDownEncoderBlock2D"),
        up_block_types=("AttnUpDecoderBlock2D", "UpDecoderBlock2D"),
        layers_per_block=1,
        latent_channels=4,
        num_vq_embeddings=64,
        vq_embed_dim=4,
        norm_num_groups=32,
        sample_size=32,
        mid_block_add_attention=mid_attention,
    ).eval()
    with torch.no_grad():
        randomize_norms(model)
        z = model.encode(images * 2 - 1).latents.permute(0, 2, 3, 1).reshape(-1, 4)  # (B*h*w, 4)
        model.quantize.embedding.weight.copy_(z[torch.randperm(z.shape[0])[:64]])
    return model


class LlamaGenVQ(nn.Module):
    """LlamaGen's VQModel (tokenizer/tokenizer_image/vq_model.py) for a small configuration: its modules under
    its names (encoder.conv_blocks[i].res/attn/downsample, a middle ModuleList of block, attention, block; the
    decoder's conv_blocks from the lowest resolution up; quantize.embedding and the quantize.codebook_used
    record), attention in every block of the last level, and its encode and decode_code."""

    def __init__(self, ch_mult, ch=32, z_channels=32, codebook_size=64, code_dim=8, blocks=2):
        from taming.modules.diffusionmodules.model import Downsample, Upsample

        super().__init__()
        levels, widths = len(ch_mult), [ch * m for m in ch_mult]
        self.encoder = nn.Module()
        self.encoder.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.encoder.conv_blocks = nn.ModuleList()
        width = ch
        for i, out in enumerate(widths):
            level = self.level([width] + [out] * (blocks - 1), out, attend=i == levels - 1)
            if i != levels - 1:
                level.downsample = Downsample(out, True)
            self.encoder.conv_blocks.append(level)
            width = out
        self.encoder.mid = self.middle(width)
        self.encoder.norm_out = nn.GroupNorm(32, width, eps=1e-6)
        self.encoder.conv_out = nn.Conv2d(width, z_channels, 3, padding=1)

        self.decoder = nn.Module()
        self.decoder.conv_in = nn.Conv2d(z_channels, width, 3, padding=1)
        self.decoder.mid = self.middle(width)
        self.decoder.conv_blocks = nn.ModuleList()
        for i in reversed(range(levels)):
            level = self.level([width] + [widths[i]] * blocks, widths[i], attend=i == levels - 1)
            if i != 0:
                level.upsample = Upsample(widths[i], True)
            self.decoder.conv_blocks.append(level)
            width = widths[i]
        self.decoder.norm_out = nn.GroupNorm(32, width, eps=1e-6)
        self.decoder.conv_out = nn.Conv2d(width, 3, 3, padding=1)

        self.quantize = nn.Module()
        self.quantize.embedding = nn.Embedding(codebook_size, code_dim)
        self.quantize.register_buffer("codebook_used", torch.zeros(65536))
        self.quant_conv = nn.Conv2d(z_channels, code_dim, 1)
        self.post_quant_conv = nn.Conv2d(code_dim, z_channels, 1)

    @staticmethod
    def level(inputs, width, attend):
        from taming.modules.diffusionmodules.model import AttnBlock, ResnetBlock

        level = nn.Module()
        level.res = nn.ModuleList(
            ResnetBlock(in_channels=c, out_channels=width, temb_channels=0, dropout=0.0) for c in inputs
        )
        level.attn = nn.ModuleList(AttnBlock(width) for _ in inputs) if attend else nn.ModuleList()
        return level

    @staticmethod
    def middle(width):
        from taming.modules.diffusionmodules.model import AttnBlock, ResnetBlock

        block = ResnetBlock(in_channels=width, out_channels=width, temb_channels=0, dropout=0.0)
        other = ResnetBlock(in_channels=width, out_channels=width, temb_channels=0, dropout=0.0)
        return nn.ModuleList([block, AttnBlock(width), other])

    @staticmethod
    def run(part, h):
        for level in part.conv_blocks:
            for i, block in enumerate(level.res):
                h = block(h, None)
                if len(level.attn) > 0:
                    h = level.attn[i](h)
            for resample in ("downsample", "upsample"):
                if hasattr(level, resample):
                    h = getattr(level, resample)(h)
        return h

    @staticmethod
    def run_middle(part, h):
        h = part.mid[0](h, None)
        return part.mid[2](part.mid[1](h), None)

    def latents(self, x):
        """Images in [-1, 1] -> z (B, code_dim, h, w) before the lookup."""
        h = self.run_middle(self.encoder, self.run(self.encoder, self.encoder.conv_in(x)))
        return self.quant_conv(self.encoder.conv_out(F.silu(self.encoder.norm_out(h))))

    def encode(self, x):
        """Images in [-1, 1] -> codes (B, h, w): the nearest code by l2 distance, both sides l2-normalized."""
        z = self.latents(x)
        B, D, h, w = z.shape
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, D), dim=-1)
        embedding = F.normalize(self.quantize.embedding.weight, dim=-1)
        d = flat.pow(2).sum(1, keepdim=True) + embedding.pow(2).sum(1) - 2 * flat @ embedding.t()
        return d.argmin(dim=1).view(B, h, w)

    def decode_code(self, codes):
        """Codes (B, h, w) -> images in about [-1, 1], from the normalized codes as LlamaGen's decoder takes them."""
        z_q = F.normalize(self.quantize.embedding.weight, dim=-1)[codes].permute(0, 3, 1, 2)  # (B, D, h, w)
        h = self.decoder.conv_in(self.post_quant_conv(z_q))
        h = self.run(self.decoder, self.run_middle(self.decoder, h))
        return self.decoder.conv_out(F.silu(self.decoder.norm_out(h)))


def llamagen_vq(ch_mult, images, seed=0):
    """LlamaGenVQ with random weights and a codebook drawn from its latents of `images` (B, 3, H, W) in [0, 1]."""
    torch.manual_seed(seed)
    model = LlamaGenVQ(ch_mult).eval()
    with torch.no_grad():
        randomize_norms(model)
        z = model.latents(images * 2 - 1).permute(0, 2, 3, 1).reshape(-1, 8)
        picks = z[torch.randint(z.shape[0], (64,))]  # with repeats where the grids hold fewer vectors
        model.quantize.embedding.weight.copy_(picks + 0.01 * torch.randn(64, 8))
    return model


def taming_discriminator(seed: int = 0, filters: int = 16, layers: int = 3, use_actnorm: bool = False) -> nn.Module:
    """taming-transformers' own PatchGAN (taming.modules.discriminator.model), as VQLPIPSWithDiscriminator builds
    it, with random weights and BatchNorm statistics a trained one's would have (not the defaults). LlamaGen's
    discriminator_patchgan.py is this class with the same initialisation, and VQLoss builds it with BatchNorm."""
    from taming.modules.discriminator.model import NLayerDiscriminator, weights_init

    torch.manual_seed(seed)
    model = NLayerDiscriminator(input_nc=3, ndf=filters, n_layers=layers, use_actnorm=use_actnorm)
    model.apply(weights_init)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.5)
                module.running_var.uniform_(0.5, 2)
                module.num_batches_tracked.fill_(1000)
    return model.eval()


def reset_accelerate_state() -> None:
    """Accelerator state is a process-wide singleton: clear it after an in-process fit, for the next one."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


@pytest.fixture
def fresh_accelerate_state():
    """Each in-process fit starts from a clean accelerator state."""
    yield
    reset_accelerate_state()


@pytest.fixture(scope="session")
def s3_endpoint():
    """A local S3 server (moto's) on 127.0.0.1 for the whole session; nothing else is reached."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


class Bucket:
    """A fresh bucket on the local S3 server and an s3fs file system to look into it."""

    def __init__(self, fs, name: str) -> None:
        self.fs = fs
        self.name = name

    def url(self, path: str = "") -> str:
        return f"s3://{self.name}/{path}" if path else f"s3://{self.name}"

    def listing(self) -> list[str]:
        self.fs.invalidate_cache()
        return sorted(self.fs.find(self.name))


def point_at_s3(monkeypatch, endpoint: str, tmp_path, key: str = "testing") -> None:
    """The environment a user sets for an S3-compatible store (MinIO, Ceph, this test server): the standard AWS
    variables, with empty config and credential files so that nobody's own profile is read."""
    for name, value in {
        "AWS_ACCESS_KEY_ID": key,
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials"),
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    import s3fs

    # fsspec keeps one file system per set of options, made with the environment of its time.
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def bucket(s3_endpoint, monkeypatch, tmp_path):
    import uuid

    import s3fs

    point_at_s3(monkeypatch, s3_endpoint, tmp_path)
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    name = f"vqtok-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    yield Bucket(fs, name)
    s3fs.S3FileSystem.clear_instance_cache()


def kill_when(command: list[str], done, at_least: int, timeout: float = 180) -> int:
    """Run command and kill it with SIGKILL once done() (say, the markers written so far) reaches at_least;
    returns done() after the kill."""
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until(proc, done, at_least, timeout)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return done()


def killed_progress(out: Path, done: int, planned: int) -> str:
    """How far a token dataset got whose one encoding process was killed with `done` shards committed, as the
    readers say it: a kill between a shard's part and its marker leaves that one part without its marker."""
    uncommitted = len(list(Path(out).glob("part-*.parquet"))) - done
    assert uncommitted in (0, 1), f"{uncommitted} part files without a marker after one process was killed"
    return f"{done} of {planned} shards done" + (", 1 part file without a commit marker" if uncommitted else "")


def interrupt_when(command: list[str], done, at_least: int, timeout: float = 180) -> subprocess.CompletedProcess:
    """Run command and press Ctrl-C once done() reaches at_least: SIGINT to its whole process group (its DataLoader
    workers too), as a terminal sends it. SIGINT is set to its default first, so that Python turns it into
    KeyboardInterrupt even where this test runs with SIGINT ignored (started in the background by a script)."""
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    wait_until(proc, done, at_least, timeout)
    os.killpg(proc.pid, signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(command, proc.returncode, stdout, stderr)


def wait_until(proc: subprocess.Popen, done, at_least: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while done() < at_least and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.005)


@pytest.fixture(scope="session", autouse=True)
def empty_torch_hub(tmp_path_factory):
    """torch hub's cache (TORCH_HOME), where vqtok looks for the VGG16 and Inception weights, empty for every
    test: what a test measures never depends on the files of the machine it runs on."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch-home")))
        yield


# torchvision's VGG16 `features` (models/vgg.py, configuration "D"): the index and (out, in) channels of each
# 3x3 convolution; ReLUs and 2x2 max pools take the indices between.
VGG16_CONVS = {0: (64, 3), 2: (64, 64), 5: (128, 64), 7: (128, 128), 10: (256, 128), 12: (256, 256), 14: (256, 256)}
VGG16_CONVS |= {17: (512, 256), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512)}


def vgg16_features_state(seed: int = 0) -> dict:
    """Random weights in the layout of torchvision's vgg16-397923af.pth, its features.* alone (He-scaled, so that
    activations keep their size through the 13 layers)."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (out, inp) in VGG16_CONVS.items():
        state[f"features.{index}.weight"] = torch.randn(out, inp, 3, 3, generator=generator) * (2 / (9 * inp)) ** 0.5
        state[f"features.{index}.bias"] = torch.randn(out, generator=generator) * 0.01
    return state


def lpips_linear_state(seed: int = 0) -> dict:
    """Random weights in the layout of the lpips package's weights/v0.1/vgg.pth: non-negative, as lpips' are."""
    generator = torch.Generator().manual_seed(seed)
    return {
        f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=generator) / c
        for k, c in enumerate((64, 128, 256, 512, 512))
    }


@pytest.fixture(scope="session")
def lpips_files(tmp_path_factory):
    """(vgg16, linear): the two files LPIPS reads, with random weights: VGG16's features (59 MB) and lpips'
    linear layers."""
    folder = tmp_path_factory.mktemp("lpips-weights")
    torch.save(vgg16_features_state(), folder / "vgg16-397923af.pth")
    torch.save(lpips_linear_state(), folder / "vgg.pth")
    return folder / "vgg16-397923af.pth", folder / "vgg.pth"


def inception_file_layout() -> dict[str, tuple]:
    """The keys and shapes of pytorch-fid's pt_inception-2015-12-05-6726825d.pth, as `fid_inception_v3()` loads it
    (strictly) into torchvision's Inception3(num_classes=1008, aux_logits=False) with its FIDInception blocks,
    which keep torchvision's layers: transcribed here from torchvision/models/inception.py, block by block."""
    convs: dict[str, tuple] = {}  # BasicConv2d -> (out, in, kh, kw)

    def conv(name, inp, out, kh, kw=None):
        convs[name] = (out, inp, kh, kh if kw is None else kw)

    def block_a(name, inp, pool_features):
        conv(f"{name}.branch1x1", inp, 64, 1)
        conv(f"{name}.branch5x5_1", inp, 48, 1)
        conv(f"{name}.branch5x5_2", 48, 64, 5)
        conv(f"{name}.branch3x3dbl_1", inp, 64, 1)
        conv(f"{name}.branch3x3dbl_2", 64, 96, 3)
        conv(f"{name}.branch3x3dbl_3", 96, 96, 3)
        conv(f"{name}.branch_pool", inp, pool_features, 1)

    def block_c(name, c7):
        conv(f"{name}.branch1x1", 768, 192, 1)
        conv(f"{name}.branch7x7_1", 768, c7, 1)
        conv(f"{name}.branch7x7_2", c7, c7, 1, 7)
        conv(f"{name}.branch7x7_3", c7, 192, 7, 1)
        conv(f"{name}.branch7x7dbl_1", 768, c7, 1)
        conv(f"{name}.branch7x7dbl_2", c7, c7, 7, 1)
        conv(f"{name}.branch7x7dbl_3", c7, c7, 1, 7)
        conv(f"{name}.branch7x7dbl_4", c7, c7, 7, 1)
        conv(f"{name}.branch7x7dbl_5", c7, 192, 1, 7)
        conv(f"{name}.branch_pool", 768, 192, 1)

    def block_e(name, inp):
        conv(f"{name}.branch1x1", inp, 320, 1)
        conv(f"{name}.branch3x3_1", inp, 384, 1)
        conv(f"{name}.branch3x3_2a", 384, 384, 1, 3)
        conv(f"{name}.branch3x3_2b", 384, 384, 3, 1)
        conv(f"{name}.branch3x3dbl_1", inp, 448, 1)
        conv(f"{name}.branch3x3dbl_2", 448, 384, 3)
        conv(f"{name}.branch3x3dbl_3a", 384, 384, 1, 3)
        conv(f"{name}.branch3x3dbl_3b", 384, 384, 3, 1)
        conv(f"{name}.branch_pool", inp, 192, 1)

    conv("Conv2d_1a_3x3", 3, 32, 3)
    conv("Conv2d_2a_3x3", 32, 32, 3)
    conv("Conv2d_2b_3x3", 32, 64, 3)
    conv("Conv2d_3b_1x1", 64, 80, 1)
    conv("Conv2d_4a_3x3", 80, 192, 3)
    block_a("Mixed_5b", 192, 32)
    block_a("Mixed_5c", 256, 64)
    block_a("Mixed_5d", 288, 64)
    conv("Mixed_6a.branch3x3", 288, 384, 3)
    conv("Mixed_6a.branch3x3dbl_1", 288, 64, 1)
    conv("Mixed_6a.branch3x3dbl_2", 64, 96, 3)
    conv("Mixed_6a.branch3x3dbl_3", 96, 96, 3)
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160), ("Mixed_6e", 192)):
        block_c(name, c7)
    conv("Mixed_7a.branch3x3_1", 768, 192, 1)
    conv("Mixed_7a.branch3x3_2", 192, 320, 3)
    conv("Mixed_7a.branch7x7x3_1", 768, 192, 1)
    conv("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7)
    conv("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1)
    conv("Mixed_7a.branch7x7x3_4", 192, 192, 3)
    block_e("Mixed_7b", 1280)
    block_e("Mixed_7c", 2048)
    layout: dict[str, tuple] = {}
    for name, (out, inp, kh, kw) in convs.items():
        layout[f"{name}.conv.weight"] = (out, inp, kh, kw)
        for entry in ("weight", "bias", "running_mean", "running_var"):
            layout[f"{name}.bn.{entry}"] = (out,)
        layout[f"{name}.bn.num_batches_tracked"] = ()
    layout["fc.weight"], layout["fc.bias"] = (1008, 2048), (1008,)
    return layout


def inception_state(seed: int = 0) -> dict:
    """Random weights in pytorch-fid's file's layout: He-scaled convolutions, batch norm near the identity."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in inception_file_layout().items():
        if key.endswith("conv.weight"):
            fan_in = shape[1] * shape[2] * shape[3]
            value = torch.randn(shape, generator=generator) * (2 / fan_in) ** 0.5
        elif key.endswith("num_batches_tracked"):
            value = torch.tensor(0)
        elif key.endswith(("bn.weight", "running_var")):
            value = 0.8 + 0.4 * torch.rand(shape, generator=generator)
        else:  # bn.bias, running_mean, fc
            value = 0.05 * torch.randn(shape, generator=generator)
        state[key] = value
    return state


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """pytorch-fid's pt_inception-2015-12-05-6726825d.pth with random weights (95 MB), written once."""
    path = tmp_path_factory.mktemp("inception-weights") / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(inception_state(), path)
    return path


def pytorch_fids_distance(mu1, sigma1, mu2, sigma2, eps=1e-6) -> float:
    """pytorch-fid's calculate_frechet_distance (src/pytorch_fid/fid_score.py), step by step: scipy's sqrtm of the
    product, an eps on the diagonals if it is not finite, and its real part. (pytorch-fid passes disp=False, which
    returns an error estimate beside the root and which scipy 1.17 deprecates.)"""
    from scipy import linalg

    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy warns of a singular product, as it is with fewer features than images
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        assert np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3)
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))
