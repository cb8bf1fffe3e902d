import io
import itertools
import random
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import bad_samples, bomb_png, broken_copy, image_bytes, image_samples, random_image, write_shard
from PIL import Image

from vqtok.data import (
    Batch,
    ImageDataset,
    ImageError,
    Sample,
    center_crop,
    collate,
    decode_image,
    expand_inputs,
    iter_samples,
    make_loader,
    random_crop_flip,
    to_tensor,
)
from vqtok.errors import DataError, VQTokError

# ---------------------------------------------------------------------------------------------- decoding


def palette_image(transparent: bool) -> bytes:
    img = Image.new("P", (2, 1), 0)
    img.putpalette([0, 0, 255, 255, 0, 0])  # 0: blue, 1: red
    img.putpixel((1, 0), 1)
    return image_bytes(img, "PNG", **({"transparency": 0} if transparent else {}))


def animated_gif() -> bytes:
    red, green = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 255, 0))
    return image_bytes(red, "GIF", save_all=True, append_images=[green], duration=100, loop=0)


def bilevel() -> bytes:
    img = Image.new("1", (2, 1), 0)
    img.putpixel((1, 0), 1)
    return image_bytes(img, "PNG")


GRAY16 = np.array([[0, 257, 257 * 128, 65535]], dtype=np.uint16)  # -> 0, 1, 128, 255

# (file bytes, mode PIL opens it in, expected RGB of each pixel of the first row, tolerance)
MODES = {
    "L": (image_bytes(np.array([[0, 100, 255]], np.uint8)), "L", [(0,) * 3, (100,) * 3, (255,) * 3], 0),
    "LA": (image_bytes(np.array([[[50, 255], [50, 0]]], np.uint8)), "LA", [(50,) * 3, (255,) * 3], 0),
    "P": (palette_image(False), "P", [(0, 0, 255), (255, 0, 0)], 0),
    "P+transparency": (palette_image(True), "P", [(255, 255, 255), (255, 0, 0)], 0),
    "RGBA": (
        image_bytes(np.array([[[255, 0, 0, 0], [255, 0, 0, 255], [255, 0, 0, 128]]], np.uint8)),
        "RGBA",
        [(255, 255, 255), (255, 0, 0), (255, 127, 127)],
        1,
    ),
    "CMYK": (image_bytes(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95), "CMYK", [(255, 0, 0)], 3),
    "I;16": (image_bytes(GRAY16), "I;16", [(v,) * 3 for v in (0, 1, 128, 255)], 0),
    "I;16B": (
        image_bytes(Image.frombytes("I;16B", (4, 1), GRAY16.astype(">u2").tobytes()), "TIFF"),
        "I;16B",
        [(v,) * 3 for v in (0, 1, 128, 255)],
        0,
    ),
    "I (16-bit PGM)": (image_bytes(GRAY16, "PPM"), "I", [(v,) * 3 for v in (0, 1, 128, 255)], 0),
    "I (32-bit)": (
        image_bytes(Image.fromarray(np.array([[-1000, 99000, 199000]], np.int32)), "TIFF"),
        "I",
        [(0,) * 3, (128,) * 3, (255,) * 3],
        0,
    ),
    "F": (
        image_bytes(Image.fromarray(np.array([[0, 0.5, 1]], np.float32)), "TIFF"),
        "F",
        [(0,) * 3, (128,) * 3, (255,) * 3],
        0,
    ),
    "1": (bilevel(), "1", [(0,) * 3, (255,) * 3], 0),
    "RGB JPEG": (image_bytes(Image.new("RGB", (8, 8), (20, 200, 90)), "JPEG", quality=95), "RGB", [(20, 200, 90)], 3),
    "RGB WebP": (
        image_bytes(np.array([[[1, 2, 3], [250, 0, 9]]], np.uint8), "WEBP", lossless=True),
        "RGB",
        [(1, 2, 3), (250, 0, 9)],
        0,
    ),
    "animated GIF": (animated_gif(), "P", [(255, 0, 0)], 0),
}


@pytest.mark.parametrize("name", MODES)
def test_every_mode_decodes_to_rgb_with_its_colours(name):
    data, opened_as, expected, tolerance = MODES[name]
    assert Image.open(io.BytesIO(data)).mode == opened_as, "the fixture lost its point"
    img = decode_image(data)
    assert img.mode == "RGB"
    row = np.asarray(img)[0].astype(int)
    assert np.abs(row[: len(expected)] - np.array(expected)).max() <= tolerance, row


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"a caption, not a picture", "not an image"),
        (image_bytes(random_image(0, 64, 64), "JPEG")[:400], "truncated or corrupt"),
        (image_bytes(random_image(0, 64, 64), "PNG")[:-40], "truncated or corrupt"),
        (bomb_png(30000, 30000), "too many pixels"),  # 900 megapixels: PIL's own error, turned into ours
    ],
    ids=["empty", "text", "truncated JPEG", "truncated PNG", "bomb"],
)
def test_bad_images_raise_image_error_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        decode_image(data)


def test_pixel_limit_is_checked_from_the_header_before_decoding():
    with pytest.raises(ImageError, match="9000x9000 is more than 50000000 pixels"):
        decode_image(bomb_png(9000, 9000), max_pixels=50_000_000)  # decoding would have found the data cut
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # PIL's DecompressionBombWarning must not escape as a warning
        with pytest.raises(ImageError, match="too many pixels"):
            decode_image(bomb_png(9500, 9500), max_pixels=10**9)


def test_large_jpeg_is_decoded_in_draft_mode():
    ramp = np.linspace(0, 255, 2048).astype(np.uint8)
    data = image_bytes(np.stack([np.tile(ramp, (2048, 1))] * 3, axis=-1), "JPEG")
    assert decode_image(data).size == (2048, 2048)
    small = decode_image(data, size=64)
    assert small.mode == "RGB" and 64 <= min(small.size) < 2048

    wide = image_bytes(np.zeros((1024, 2048, 3), np.uint8), "JPEG")
    assert decode_image(wide, size=300).size == (1024, 512)  # 1/2: 1/4 would leave a shorter side of 256


# ---------------------------------------------------------------------------------------------- crops


def test_center_crop_keeps_the_middle():
    array = np.zeros((100, 300, 3), np.uint8)
    array[:, 100:200] = 255  # a white middle third
    crop = center_crop(Image.fromarray(array), 32)
    assert crop.size == (32, 32)
    assert np.asarray(crop)[:, 2:-2].min() >= 250


@pytest.mark.parametrize("size", [(300, 200), (200, 300), (64, 64), (10, 20)])
def test_crops_are_square_at_any_aspect(size):
    img = Image.fromarray(random_image(1, size[1], size[0]))
    assert center_crop(img, 64).size == (64, 64)
    rng = random.Random(0)
    assert all(random_crop_flip(img, 64, rng).size == (64, 64) for _ in range(5))


def test_random_crop_flip_varies_and_repeats_with_its_seed():
    img = Image.fromarray(random_image(2, 40, 80))
    crops = [to_tensor(random_crop_flip(img, 32, random.Random(seed))) for seed in range(12)]
    assert len({c.numpy().tobytes() for c in crops}) > 6
    again = to_tensor(random_crop_flip(img, 32, random.Random(3)))
    assert torch.equal(crops[3], again)
    square = Image.fromarray(random_image(3, 32, 32))  # no room to move: only the flip can change it
    outcomes = {to_tensor(random_crop_flip(square, 32, random.Random(seed))).numpy().tobytes() for seed in range(12)}
    assert outcomes == {to_tensor(square).numpy().tobytes(), to_tensor(square).flip(2).numpy().tobytes()}


def test_to_tensor_is_uint8_channels_first():
    array = random_image(4, 5, 7)
    tensor = to_tensor(Image.fromarray(array))
    assert tensor.dtype == torch.uint8 and tensor.shape == (3, 5, 7) and tensor.is_contiguous()
    assert torch.equal(tensor, torch.from_numpy(array).permute(2, 0, 1))


# ---------------------------------------------------------------------------------------------- shards


def expand_shards(specs) -> list[str]:
    return expand_inputs(specs).names


def test_expand_shards(tmp_path):
    for name in ["b.tar", "a.tar", "c.tar", "notes.txt"]:
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "empty").mkdir()
    a, b, c = (str(tmp_path / n) for n in ["a.tar", "b.tar", "c.tar"])
    assert expand_shards([b, a]) == [b, a]
    assert expand_shards([str(tmp_path)]) == [a, b, c]
    assert expand_shards([str(tmp_path / "*.tar")]) == [a, b, c]
    assert expand_shards([str(tmp_path / "{c,a}.tar")]) == [c, a]
    assert expand_shards([c, str(tmp_path), a]) == [c, a, b]
    assert expand_shards(c) == [c]  # a lone string is one spec
    assert expand_shards([f"{tmp_path}/./sub/../a.tar"]) == [a]  # one file, one name
    assert expand_shards(["pipe:cat x-{0..1}.tar"]) == ["pipe:cat x-0.tar", "pipe:cat x-1.tar"]


def test_a_folder_of_compressed_shards_is_read_as_shards(tmp_path):
    import bz2
    import gzip
    import lzma

    compressors = {
        "a.tar.gz": gzip.compress,
        "b.tgz": gzip.compress,
        "c.tar.bz2": bz2.compress,
        "d.TAR.XZ": lzma.compress,
    }
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, (name, compress) in enumerate(compressors.items()):
        tar = write_shard(plain / f"{i}.tar", image_samples([f"k{i}-{j}" for j in range(2)], seed=i))
        (tmp_path / name).write_bytes(compress(Path(tar).read_bytes()))
    assert expand_shards([str(tmp_path)]) == [str(tmp_path / name) for name in compressors]
    assert [s.key for s in iter_samples(str(tmp_path / "b.tgz"))] == ["k1-0", "k1-1"]
    zstd = tmp_path / "zstd"
    zstd.mkdir()
    (zstd / "e.tar.zst").write_bytes(b"\x28\xb5\x2f\xfd")  # Python 3.11's tarfile cannot read zstd: no shard
    with pytest.raises(DataError, match="zstd: holds no shards"):
        expand_shards([str(zstd)])


def test_expand_shards_numbered_pattern(tmp_path):
    names = [str(tmp_path / f"train-{i:06d}.tar") for i in range(3)]
    for name in names:
        Path(name).touch()
    assert expand_shards([str(tmp_path / "train-{000000..000002}.tar")]) == names
    with pytest.raises(DataError, match=r"train-000003.tar \(from .*train-\{000000..000003\}.tar\): no such file"):
        expand_shards([str(tmp_path / "train-{000000..000003}.tar")])


@pytest.mark.parametrize(
    "spec, message",
    [
        ("missing.tar", "missing.tar: no such file or directory"),
        ("*.tgz", r"\*.tgz: no files match"),
        ("empty", r"empty: holds no shards \(.tar, .tar.gz, .*\), no image files \(jpg, jpeg, png.*\) and no .parquet"),
        ("x-{0..1.tar", "unbalanced braces"),
    ],
)
def test_expand_shards_names_the_spec_that_matches_nothing(tmp_path, spec, message):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match=message) as caught:
        expand_shards([str(tmp_path / spec)])
    assert isinstance(caught.value, VQTokError) and "\n" not in str(caught.value)


def test_expand_shards_refuses_an_empty_list():
    with pytest.raises(DataError, match="no inputs given"):
        expand_shards([])


def test_iter_samples_groups_members_by_key(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("__index__", b"skip me"),
            ("a/0001.JPG", b"j"),
            ("a/0001.seg.png", b"s"),
            ("a/0001.cls", b"1"),
            ("README", b"no extension: no sample"),
            ("0002.txt", b"t"),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("somedir")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
    assert list(iter_samples(str(path))) == [
        Sample("a/0001", str(path), {"jpg": b"j", "seg.png": b"s", "cls": b"1"}),
        Sample("0002", str(path), {"txt": b"t"}),
    ]
    assert list(iter_samples(f"pipe:cat {path}")) == [
        Sample(s.key, f"pipe:cat {path}", s.fields) for s in iter_samples(str(path))
    ]


def test_iter_samples_reads_compressed_shards(make_shard):
    path = make_shard("shard.tar.gz", image_samples(["x", "y"]))
    assert [s.key for s in iter_samples(path)] == ["x", "y"]


def first_member(path, key):
    """(header offset, data offset, size) of the first member of a sample: tar order, not name order."""
    with tarfile.open(path) as tar:
        member = next(m for m in tar.getmembers() if m.name.startswith(f"{key}."))
        return member.offset, member.offset_data, member.size


def png_data(path, key):
    """(data offset, size) of a sample's PNG."""
    with tarfile.open(path) as tar:
        member = tar.getmember(f"{key}.png")
        return member.offset_data, member.size


@pytest.mark.parametrize("where", ["inside data", "at a header", "corrupt header"])
def test_broken_tar_yields_the_samples_before_the_break_then_raises(make_shard, where):
    path = make_shard("shard.tar", image_samples(["k0", "k1", "k2", "k3"]))
    header, _, _ = first_member(path, "k2")
    data, size = png_data(path, "k2")
    if where == "inside data":
        broken, reason = broken_copy(path, cut=data + size // 2), "unreadable after 2 complete samples"
        expected, lost = ["k0", "k1"], "k2"
    elif where == "at a header":  # a cut on a block boundary: only the missing end-of-archive marker tells
        broken, reason = broken_copy(path, cut=header), "cut short after 1 complete samples"
        expected, lost = ["k0"], "k1"  # k1 was read whole, but nothing says all its fields were
    else:
        broken, reason = broken_copy(path, overwrite=header), "corrupt tar header after 1 complete samples"
        expected, lost = ["k0"], "k1"
    seen = []
    with pytest.raises(DataError, match=reason) as caught:
        for sample in iter_samples(broken):
            seen.append(sample.key)
    assert seen == expected and str(caught.value).startswith(broken)
    assert caught.value.key == lost  # the sample being read when it broke, so that it can be accounted for


@pytest.mark.parametrize("content", [None, b"", b"not a tar at all" * 100])
def test_unreadable_shard_raises_data_error(tmp_path, content):
    path = tmp_path / "x.tar"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(DataError, match=str(path)):
        list(iter_samples(str(path)))


# ---------------------------------------------------------------------------------------------- datasets


def test_bad_samples_become_error_records_and_the_rest_come_through(make_shard):
    good = image_samples(["g0", "g1", "g2"])
    bad = bad_samples()
    shard = make_shard("mixed.tar", [good[0], *bad[:3], good[1], *bad[3:], good[2]])
    records = list(ImageDataset([shard], 16))
    assert [r["key"] for r in records] == ["g0", "truncated", "empty", "text", "g1", "bomb", "label-only", "g2"]
    reasons = {r["key"]: r["error"] for r in records if r["image"] is None}
    assert sorted(reasons) == sorted(sample["__key__"] for sample in bad)
    assert reasons["truncated"].startswith("truncated or corrupt")
    assert reasons["empty"] == "empty file" and reasons["text"] == "not an image"
    assert reasons["bomb"].startswith("too many pixels")
    assert reasons["label-only"] == "no image field (fields: cls)"
    for record in records:
        assert record["shard"] == shard
        if record["error"] is None:
            assert record["image"].dtype == torch.uint8 and record["image"].shape == (3, 16, 16)


def test_broken_shard_gives_one_error_record_then_the_next_shard(make_shard):
    path = make_shard("b.tar", image_samples(["b0", "b1", "b2"]))
    data, size = png_data(path, "b2")
    cut = broken_copy(path, cut=data + size // 2)
    whole = make_shard("a.tar", image_samples(["a0", "a1"]))
    records = list(ImageDataset([cut, whole], 8))
    assert [(r["key"], r["shard"]) for r in records] == [
        ("b0", cut),
        ("b1", cut),
        ("b2", cut),  # the sample the shard broke in
        ("a0", whole),
        ("a1", whole),
    ]
    assert records[2]["image"] is None
    assert records[2]["error"].startswith(f"{cut}: unreadable after 2 complete samples")


def test_collate_stacks_the_good_and_lists_the_bad():
    image = torch.zeros(3, 8, 8, dtype=torch.uint8)
    records = [
        {"key": "a", "shard": "s", "image": image, "error": None},
        {"key": "b", "shard": "s", "image": None, "error": "not an image"},
    ]
    batch = collate(records)
    assert isinstance(batch, Batch) and batch.images.shape == (1, 3, 8, 8)
    assert batch.keys == ["a"] and batch.shards == ["s"] and batch.errors == [("b", "s", "not an image")]
    assert collate(records[1:], image_size=8).images.shape == (0, 3, 8, 8)
    assert collate(records[1:]).images.shape == (0, 3, 0, 0)


def test_every_key_exactly_once_across_two_ranks_and_two_workers(make_shard):
    shards, expected = [], []
    for i in range(5):
        keys = [f"s{i}-{j}" for j in range(3)]
        samples = image_samples(keys, seed=10 * i)
        samples[1]["png"] = b"broken"  # error records are accounted for too
        shards.append(make_shard(f"shard-{i}.tar", samples))
        expected += keys
    seen = Counter()
    for rank in range(2):
        loader = make_loader(shards, 8, batch_size=2, num_workers=2, rank=rank, world_size=2)
        for batch in loader:
            assert batch.images.shape[1:] == (3, 8, 8)
            seen.update(batch.keys)
            seen.update(key for key, _, reason in batch.errors if reason == "not an image")
    assert seen == Counter(expected)


def test_resampled_stream_is_endless_and_shuffled(make_shard):
    shard = make_shard("small.tar", image_samples(["a", "b", "c"]) + [{"__key__": "bad", "jpg": b"x"}])
    loader = make_loader([shard], 8, batch_size=4, train=True, resample=True, num_workers=2, shuffle_buffer=6)
    batches = list(itertools.islice(loader, 10))
    assert len(batches) == 10
    for batch in batches:
        assert batch.images.shape == (4, 3, 8, 8) and not batch.errors and set(batch.keys) <= {"a", "b", "c"}
    assert len({tuple(b.keys) for b in batches}) > 1


def first_error(loader) -> str:
    """The message of the DataError the loader raises.

    torch re-raises a worker's exception from a frame that holds it, so a kept traceback puts the loader in a
    reference cycle, and torch waits 5 s for each worker of a loader that only the garbage collector frees.
    """
    try:
        next(iter(loader))
    except DataError as exc:
        exc.__traceback__ = None
        return str(exc)
    pytest.fail("no DataError raised")


def test_resampling_shards_without_images_raises_instead_of_spinning(make_shard, tmp_path):
    labels = make_shard("labels.tar", [{"__key__": f"k{i}", "cls": b"1"} for i in range(3)])
    undecodable = make_shard("bad.tar", [{"__key__": "x", "jpg": b"not a jpeg"}])
    shards = [labels, undecodable, str(tmp_path / "missing.tar")]
    in_process = first_error(make_loader(shards, 8, batch_size=2, resample=True, num_workers=0))
    assert in_process == "none of the 3 shards holds an image that can be decoded"
    in_worker = first_error(make_loader(shards, 8, batch_size=2, resample=True, num_workers=1))
    assert "none of the 3 shards holds an image" in in_worker


def test_dataset_refuses_no_shards():
    with pytest.raises(DataError):
        ImageDataset([], 8)
