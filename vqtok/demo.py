"""`vqtok demo`: the whole loop on photographs that ship with scikit-image, with nothing to download.

Shards of 32x32 crops are cut from some of the photographs; a small VQ-VAE is fitted on them; photographs
it never saw are encoded at 128x128 into 32x32 code grids, decoded back, and compared with the originals.
With `prior_steps`, the training crops are encoded too (8x8 grids, the photograph as the class), a prior is
fitted on them, and grids it samples for each photograph are decoded. Every stage goes through the same
library functions as the commands, so the demo's outputs are the real thing: shards, a run folder with
checkpoints and the model, token datasets, decoded PNGs.
"""

from __future__ import annotations

import io
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from vqtok.config import ModelConfig, QuantizerConfig, TrainConfig
from vqtok.errors import ConfigError

# The training photographs and the held-out ones never overlap (chelsea and cat are one photograph).
TRAIN_PHOTOS = ("astronaut", "clock", "immunohistochemistry", "hubble_deep_field", "retina", "camera", "brick")
TRAIN_PHOTOS += ("grass", "gravel", "moon", "page", "text", "colorwheel")  # the colour wheel: every hue
HELD_OUT_PHOTOS = ("chelsea", "coffee", "coins", "rocket")
CROP, HELD_OUT_SIZE, SHORTER_SIDE = 32, 128, 160  # photos are scaled so a 32x32 crop holds part of an object
CROPS_PER_PHOTO, MARKER = 300, ".vqtok-demo"
PRIOR_SAMPLES = 8  # grids sampled per training photograph
MODEL = ModelConfig(hidden_channels=64, image_size=CROP, quantizer=QuantizerConfig(codebook_size=512, code_dim=64))


@dataclass
class DemoResult:
    out: Path
    psnr: float  # held-out photographs, 128x128, decoded PNG against the original
    usage: float  # share of the codebook the held-out photographs use
    images: dict[str, int] = field(default_factory=dict)  # stage -> images it processed
    seconds: dict[str, float] = field(default_factory=dict)  # stage -> seconds
    paths: dict[str, Path] = field(default_factory=dict)  # what -> where


def photo(name: str) -> Image.Image:
    """One of scikit-image's photographs by name, scaled to a shorter side of SHORTER_SIDE pixels."""
    try:
        import skimage.data
    except ImportError:
        raise ConfigError("vqtok demo takes its photographs from scikit-image: pip install 'vqtok[demo]'") from None
    return scaled(Image.fromarray(getattr(skimage.data, name)()))


def scaled(image: Image.Image) -> Image.Image:
    """An RGB copy with a shorter side of SHORTER_SIDE pixels: a 32x32 crop then holds part of an object."""
    image = image.convert("RGB")
    scale = SHORTER_SIDE / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)


def write_shard(path: Path, images: list[Image.Image], prefix: str, labels: list[int] | None = None) -> str:
    import webdataset

    with webdataset.TarWriter(str(path)) as sink:
        for i, image in enumerate(images):
            buffer = io.BytesIO()
            image.save(buffer, "PNG")
            sample = {"__key__": f"{prefix}-{i:05d}", "png": buffer.getvalue()}
            if labels is not None:
                sample["cls"] = str(labels[i]).encode()
            sink.write(sample)
    return str(path)


def random_crops(names, count: int, size: int, rng: np.random.Generator) -> list[Image.Image]:
    crops = []
    for name in names:
        image = photo(name)
        for _ in range(count):
            x, y = rng.integers(0, image.width - size + 1), rng.integers(0, image.height - size + 1)
            crops.append(image.crop((x, y, x + size, y + size)))
    return crops


def make_shards(folder: Path, seed: int = 0) -> dict[str, list[str]]:
    """Training shards of crops, a validation shard of held-out crops, and the held-out photographs."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True)
    crops = random_crops(TRAIN_PHOTOS, CROPS_PER_PHOTO, CROP, rng)
    train = list(zip(crops, [i for i in range(len(TRAIN_PHOTOS)) for _ in range(CROPS_PER_PHOTO)], strict=True))
    rng.shuffle(train)  # (crop, the photograph's index as its class)
    quarter = math.ceil(len(train) / 4)
    parts = [train[i * quarter : (i + 1) * quarter] for i in range(4)]
    train_shards = [
        write_shard(folder / f"train-{i:06d}.tar", [c for c, _ in part], f"train{i}", [label for _, label in part])
        for i, part in enumerate(parts)
    ]
    val = write_shard(folder / "val.tar", random_crops(HELD_OUT_PHOTOS, 50, CROP, rng), "val")
    # The whole held-out photographs (centre squares at 128x128) and a few more 128x128 views of each.
    views = [photo(name) for name in HELD_OUT_PHOTOS] + random_crops(HELD_OUT_PHOTOS, 7, HELD_OUT_SIZE, rng)
    held_out = write_shard(folder / "held-out-000000.tar", views, "photo")
    return {"train": train_shards, "val": [val], "held_out": [held_out]}


def run_demo(
    out: str | Path = "vqtok-demo", steps: int = 3000, show_progress: bool = True, prior_steps: int | None = None
) -> DemoResult:
    from vqtok.data import iter_samples, sample_image
    from vqtok.decode import decode, key_path
    from vqtok.encode import encode
    from vqtok.tokens import read_codes, summarize
    from vqtok.train import fit

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ConfigError(f"{out} is not empty and was not made by vqtok demo: choose another --out")
        shutil.rmtree(out)  # a previous demo's folder: start again
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("made by vqtok demo; the next demo run into this folder replaces it\n")
    result = DemoResult(out, psnr=0.0, usage=0.0)

    started = time.perf_counter()
    shards = make_shards(out / "shards")
    result.seconds["shards"] = time.perf_counter() - started

    train = TrainConfig(steps=steps, batch_size=32, lr=1e-3, eval_every=steps, save_every=steps, log_every=50)
    started = time.perf_counter()
    fitted = fit(shards["train"], out / "run", MODEL, train, val_shards=shards["val"], show_progress=show_progress)
    result.images["fit"], result.seconds["fit"] = steps * train.batch_size, time.perf_counter() - started

    model_dir = fitted.model_dir
    tokens = out / "tokens.parquet"
    encoded = encode(shards["held_out"], tokens, model_dir, image_size=HELD_OUT_SIZE, show_progress=show_progress)
    result.images["encode"], result.seconds["encode"] = encoded.images, encoded.seconds
    decoded = decode(tokens, out / "decoded", model_dir, show_progress=show_progress)
    result.images["decode"], result.seconds["decode"] = decoded.images, decoded.seconds

    # The originals exactly as encode saw them, against the decoded PNGs.
    keys, _ = read_codes(tokens)
    held_out = iter_samples(shards["held_out"][0])
    originals = {s.key: sample_image(s, HELD_OUT_SIZE).permute(1, 2, 0).numpy() for s in held_out}  # (S, S, 3)
    decoded_pixels = {}
    for key in keys:
        with Image.open(out / "decoded" / f"{key_path(key)}.png") as image:
            decoded_pixels[key] = np.asarray(image)
    mse = np.mean([((decoded_pixels[k].astype(float) - originals[k]) ** 2).mean() for k in keys])
    result.psnr = 10 * math.log10(255**2 / mse)
    result.usage = summarize(tokens)["usage"]

    shown = keys[: len(HELD_OUT_PHOTOS)]  # the whole photographs
    top = np.concatenate([originals[k] for k in shown], axis=1)
    bottom = np.concatenate([decoded_pixels[k] for k in shown], axis=1)
    picture = out / "reconstructions.png"
    Image.fromarray(np.concatenate([top, bottom], axis=0)).save(picture)
    prior_paths = demo_prior(out, shards["train"], model_dir, prior_steps, result, show_progress) if prior_steps else {}
    result.paths = {
        "picture (originals over reconstructions)": picture,
        **prior_paths,
        "shards": out / "shards",
        "run (checkpoints, metrics, samples)": out / "run",
        "model": model_dir,
        "tokens": tokens,
        "decoded PNGs": out / "decoded",
    }
    return result


def demo_prior(out: Path, train_shards: list[str], model_dir: Path, steps: int, result: DemoResult, show_progress):
    """The training crops encoded with their photograph as the class, a prior fitted on the grids, PRIOR_SAMPLES
    grids sampled for each photograph and decoded: a picture with a row of samples per training photograph."""
    from vqtok.config import PriorConfig, PriorTrainConfig
    from vqtok.decode import decode
    from vqtok.encode import encode
    from vqtok.prior.fit import fit_prior
    from vqtok.prior.sample import sample

    tokens = out / "train-tokens.parquet"
    encoded = encode(train_shards, tokens, model_dir, keep=["cls"], show_progress=show_progress)
    result.images["encode crops"], result.seconds["encode crops"] = encoded.images, encoded.seconds
    started = time.perf_counter()
    train = PriorTrainConfig(steps=steps, eval_every=steps, save_every=steps)
    fitted = fit_prior([str(tokens)], out / "prior", PriorConfig(), train, cond="cls", show_progress=show_progress)
    result.images["prior fit"] = steps * train.batch_size
    result.seconds["prior fit"] = time.perf_counter() - started
    sampled = sample(fitted.model_dir, out / "sampled.parquet", per_class=PRIOR_SAMPLES, show_progress=show_progress)
    result.images["prior sample"], result.seconds["prior sample"] = sampled.grids, sampled.seconds
    decoded = decode(out / "sampled.parquet", out / "sampled", model_dir, show_progress=show_progress)
    rows = []
    for label in range(len(TRAIN_PHOTOS)):
        keys = [f"sample-{label * PRIOR_SAMPLES + i:06d}" for i in range(PRIOR_SAMPLES)]
        rows.append(np.concatenate([np.asarray(Image.open(decoded.out / f"{key}.png")) for key in keys], axis=1))
    picture = out / "samples.png"
    Image.fromarray(np.concatenate(rows, axis=0)).save(picture)
    return {"picture (sampled crops, a row per training photograph)": picture, "prior": fitted.model_dir}
