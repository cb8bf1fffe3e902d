"""Inputs beside shards: image folders and Parquet datasets, recognised, read, encoded, resumed and refused."""

import json
import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    class_images,
    image_bytes,
    kill_when,
    random_image,
    write_hf_parquet,
    write_image_folder,
    write_path_only_parquet,
    write_shard,
)

from vqtok import VQVAE
from vqtok.cli import cli
from vqtok.data import center_crop, decode_image, to_tensor
from vqtok.errors import DataError
from vqtok.sources import expand_inputs, iter_samples, listing_record
from vqtok.tokens import read_codes, read_errors, read_metadata
from vqtok.tokens.format import SETTINGS_NAME, STATS_DIR

pytestmark = pytest.mark.usefixtures("offline_datasets")


def invoke(*args):
    return CliRunner().invoke(cli, [*map(str, args)])


def samples_of(inputs):
    return [sample for unit in inputs.units for sample in iter_samples(unit)]


def reference_codes(model_dir, images: dict[str, bytes], size=16) -> dict[str, np.ndarray]:
    model = VQVAE.from_pretrained(model_dir)
    crops = torch.stack([to_tensor(center_crop(decode_image(data, size), size)) for data in images.values()])
    return dict(zip(images, model.encode(crops.float() / 255).numpy(), strict=True))


# ---------------------------------------------------------------------------------------------- folders


def test_a_folder_is_listed_recursively_in_sorted_slices_keyed_by_relative_path(tmp_path):
    images = class_images()
    root = write_image_folder(tmp_path / "train", images)
    jpeg = image_bytes(random_image(9), "JPEG")
    (root / "cat" / "upper.JPEG").write_bytes(jpeg)
    (root / "notes.txt").write_text("not an image")
    (root / "dog" / "._0.png").write_bytes(b"macOS metadata")  # hidden files and folders are skipped
    (root / ".cache").mkdir()
    (root / ".cache" / "thumb.png").write_bytes(images["cat/0"])

    inputs = expand_inputs([str(root)], files_per_part=4, class_from_folder=True, keep=["cls"])
    assert inputs.names == [f"{root}[0:4]", f"{root}[4:7]"]
    samples = samples_of(inputs)
    assert [s.key for s in samples] == ["cat/0", "cat/1", "cat/2", "cat/upper", "dog/0", "dog/1", "dog/2"]
    assert samples[3].fields == {"jpeg": jpeg, "cls": 0} and samples[3].shard == f"{root}[0:4]"
    assert samples[4].fields == {"png": images["dog/0"], "cls": 1}
    assert inputs.classes == ("cat", "dog") and inputs.kept_types == ("int64",)
    relative = ["cat/0.png", "cat/1.png", "cat/2.png", "cat/upper.JPEG", "dog/0.png", "dog/1.png", "dog/2.png"]
    assert inputs.listings == {str(root): {**listing_record(relative), "files_per_part": 4}}
    assert inputs.listings[str(root)]["files"] == 7


def test_an_unreadable_file_is_an_error_sample_and_the_rest_come_through(tmp_path):
    root = write_image_folder(tmp_path / "photos", class_images(("a",), per_class=3))
    inputs = expand_inputs([str(root)])
    (root / "a" / "1.png").unlink()  # gone between the listing and the reading
    samples = samples_of(inputs)
    assert [(s.key, s.error is None) for s in samples] == [("a/0", True), ("a/1", False), ("a/2", True)]
    assert samples[1].error.startswith("cannot read") and samples[1].fields == {}


@pytest.mark.parametrize(
    "make, options, message",
    [
        (
            lambda r: (r / "a" / "x.jpg").write_bytes(b"j"),
            {},
            "a/x.jpg and a/x.png would both have the key a/x; rename one",
        ),
        (lambda r: (r / "loose.png").write_bytes(b"p"), {"class_from_folder": True}, "loose.png is in no class folder"),
        (lambda r: (r / "t.parquet").write_bytes(b"p"), {}, "holds both image files and .parquet files"),
        (lambda r: None, {"keep": ["txt"]}, "cannot carry 'txt' from a folder of images"),
        (lambda r: None, {"keep": ["cls"]}, "cannot carry 'cls' from a folder of images"),
    ],
    ids=["same key", "no class folder", "mixed", "keep txt", "cls without --class-from-folder"],
)
def test_a_folder_that_cannot_be_read_one_way_is_refused(tmp_path, make, options, message):
    root = tmp_path / "photos"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"p")
    make(root)
    with pytest.raises(DataError, match=message) as caught:
        expand_inputs([str(root)], **options)
    assert "\n" not in str(caught.value)


# ---------------------------------------------------------------------------------------------- Parquet


def test_a_dataset_written_by_datasets_is_read_with_its_labels(tmp_path):
    images = class_images()
    root = write_hf_parquet(tmp_path / "hf", images, files=2, key_column=None)
    (root / "README.md").write_text("a dataset card")
    files = [str(root / "data" / f"train-0000{i}-of-00002.parquet") for i in range(2)]
    inputs = expand_inputs([str(root)], keep=["label", "caption"])
    assert inputs.names == files
    assert expand_inputs([str(root / "data" / "*.parquet")]).names == files  # a glob is the same input
    assert inputs.kept_types == ("int64", "string")
    samples = samples_of(inputs)
    assert [s.key for s in samples] == [f"train-0000{i}-of-00002/{row}" for i in range(2) for row in range(3)]
    assert [s.fields["label"] for s in samples] == [0, 0, 0, 1, 1, 1]
    assert samples[4].fields == {"image": images["dog/1"], "label": 1, "caption": "a picture of dog/1"}


def test_a_key_column_names_the_rows(tmp_path):
    images = class_images(per_class=2)
    root = write_hf_parquet(tmp_path / "hf", images, files=1, key_column="__key__")
    assert [s.key for s in samples_of(expand_inputs([str(root)]))] == list(images)


def test_image_columns_plain_binary_several_and_missing(tmp_path):
    png = image_bytes(random_image(1))
    path = tmp_path / "plain.parquet"
    pq.write_table(pa.table({"id": [7, 8], "jpg": [png, None], "mask": [png, png], "score": [0.5, 1.5]}), path)
    with pytest.raises(DataError, match=r"several image columns \(jpg, mask\); choose one with --image-column"):
        expand_inputs([str(path)])
    inputs = expand_inputs([str(path)], image_column="jpg", keep=["score"])
    samples = samples_of(inputs)
    assert [(s.key, s.error) for s in samples] == [
        ("7", None),
        ("8", "no image (null)"),
    ]
    assert samples[0].fields == {"image": png, "score": 0.5} and inputs.kept_types == ("float64",)
    with pytest.raises(DataError, match="column 'score' holds no image bytes"):
        expand_inputs([str(path)], image_column="score")
    with pytest.raises(DataError, match="no column 'label' to carry"):
        expand_inputs([str(path)], image_column="jpg", keep=["label"])
    pq.write_table(pa.table({"id": [1]}), tmp_path / "none.parquet")
    with pytest.raises(DataError, match="no image column"):
        expand_inputs([str(tmp_path / "none.parquet")])


# ---------------------------------------------------------------------------------------------- path-only rows


def test_path_only_rows_are_read_under_image_root_and_refused_outside_it(tmp_path):
    images = class_images(("a",), per_class=3)
    root = write_image_folder(tmp_path / "root", images)
    outside = write_image_folder(tmp_path / "outside", {"secret": images["a/0"]})
    (root / "link.png").symlink_to(outside / "secret.png")
    paths = [
        "a/0.png",  # relative: resolved under the root
        str(root / "a" / "1.png"),  # absolute, inside the root
        str(outside / "secret.png"),  # absolute, outside
        "../outside/secret.png",  # a relative path that climbs out
        "link.png",  # inside by name, outside through a symbolic link
        f"{root}/a/../../outside/secret.png",  # absolute, climbing out
        "a/missing.png",
    ]
    (root / "a" / "missing.png").write_bytes(b"")  # `datasets` looks at the files as it writes
    parquet = write_path_only_parquet(tmp_path / "paths.parquet", paths, folder=root)
    (root / "a" / "missing.png").unlink()

    plain = samples_of(expand_inputs([parquet]))
    hint = "(a path inside a file is read only with --image-root DIR)"
    assert [s.error for s in plain] == [f"only a path, no image bytes: {path} {hint}" for path in paths]
    assert all(s.fields == {} for s in plain)

    rooted = samples_of(expand_inputs([parquet], image_root=root))
    assert [s.fields for s in rooted[:2]] == [{"image": images["a/0"]}, {"image": images["a/1"]}]
    assert [s.error for s in rooted[:2]] == [None, None]
    real_root = os.path.realpath(root)
    for sample, path in zip(rooted[2:6], paths[2:6], strict=True):
        assert sample.fields == {} and sample.error == f"path outside --image-root: {path} is not under {real_root}"
    assert rooted[6].error.startswith("cannot read: a/missing.png: ")

    (tmp_path / "root-link").symlink_to(root)  # a root named through a link is the folder it leads to
    assert samples_of(expand_inputs([parquet], image_root=tmp_path / "root-link"))[1].fields == rooted[1].fields
    with pytest.raises(DataError, match="--image-root .*nowhere: no such folder"):
        expand_inputs([parquet], image_root=tmp_path / "nowhere")
    with pytest.raises(DataError, match="--image-root s3://bucket/images: must be a local folder"):
        expand_inputs([parquet], image_root="s3://bucket/images")


def test_a_crafted_path_in_a_row_is_an_error_row_not_a_crash(model_dir, tmp_path):
    """A path with a NUL byte (os.path.realpath raises ValueError) or one stored as bytes (TypeError) is
    that row's error; the run goes on with the other rows."""
    images = class_images(("a",), per_class=1)
    root = write_image_folder(tmp_path / "images", images)
    folder = tmp_path / "paths"
    folder.mkdir()
    for name, path_type, crafted in [("nul", pa.string(), "a/0.png\x00.png"), ("bytes", pa.binary(), b"a/0.png")]:
        good = "a/0.png" if path_type == pa.string() else b"a/0.png"  # the same column type: a file of one schema
        column = pa.array(
            [{"bytes": None, "path": good}, {"bytes": None, "path": crafted}],
            pa.struct([("bytes", pa.binary()), ("path", path_type)]),
        )
        pq.write_table(pa.table({"image": column}), folder / f"{name}.parquet")

    nul, binary = (samples_of(expand_inputs([str(folder / f"{n}.parquet")], image_root=root)) for n in ("nul", "bytes"))
    assert nul[0].fields == {"image": images["a/0"]} and nul[0].error is None
    assert nul[1].fields == {} and nul[1].error == "not a path: 'a/0.png\\x00.png': embedded null byte"
    assert [s.error for s in binary] == ["not a path: b'a/0.png' is bytes, not text"] * 2

    out = tmp_path / "tokens.parquet"
    args = ["--image-root", root, "--num-workers", "0", "--max-error-rate", "1"]
    result = invoke("encode", folder / "nul.parquet", folder / "bytes.parquet", out, "--model", model_dir, *args)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert read_codes(out)[0] == ["nul/0"] and len(read_errors(out)) == 3


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_encode_and_fit_read_path_only_rows_with_image_root(model_dir, tmp_path):
    images = class_images(per_class=2)
    root = write_image_folder(tmp_path / "images", images)
    parquet = write_path_only_parquet(tmp_path / "paths.parquet", [f"{key}.png" for key in images], folder=root)
    out = tmp_path / "tokens.parquet"
    result = invoke("encode", parquet, out, "--model", model_dir, "--image-root", root, "--num-workers", "0")
    assert result.exit_code == 0, result.output
    keys, codes = read_codes(out)
    assert keys == [f"paths/{i}" for i in range(len(images))] and len(read_errors(out)) == 0  # FILE-STEM/ROW
    expected = reference_codes(model_dir, images)
    for grid, key in zip(codes, images, strict=True):
        assert np.array_equal(grid, expected[key]), key

    run = tmp_path / "run"
    args = ["fit", root, "--out", run, "--val", parquet, "--image-root", root, "--hidden", "8", "--codebook-size", "8"]
    result = invoke(*args, "--code-dim", "4", "--image-size", "16", "--batch-size", "4", "--steps", "1")
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["images"] for m in metrics if m["split"] == "val"] == [len(images)]  # every row, read from its path


# ---------------------------------------------------------------------------------------------- encode


def test_encode_a_folder_with_classes_from_its_folders(model_dir, tmp_path):
    images = class_images(("cat", "dog", "emu"), per_class=2)
    root = write_image_folder(tmp_path / "train", images)
    out = tmp_path / "tokens.parquet"
    result = invoke("encode", root, out, "--model", model_dir, "--class-from-folder", "--files-per-part", "4")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).sort_by("key")
    assert table.column("key").to_pylist() == sorted(images)
    assert table.column("cls").to_pylist() == [0, 0, 1, 1, 2, 2] and table.schema.field("cls").type == pa.int64()
    assert sorted(set(table.column("shard").to_pylist())) == [f"{root}[0:4]", f"{root}[4:6]"]
    assert read_metadata(out)["classes"] == ["cat", "dog", "emu"]
    keys, codes = read_codes(out)
    expected = reference_codes(model_dir, images)
    assert all(np.array_equal(grid, expected[key]) for key, grid in zip(keys, codes, strict=True))

    info = invoke("info", out, "--json")
    assert json.loads(info.output)["classes"] == ["cat", "dog", "emu"]
    assert "3: 0 cat, 1 dog, 2 emu" in invoke("info", out).output


def test_encode_a_hugging_face_dataset_carries_its_columns(model_dir, tmp_path):
    images = class_images()
    root = write_hf_parquet(tmp_path / "hf", images, files=2)
    out = tmp_path / "tokens.parquet"
    result = invoke("encode", root / "data", out, "--model", model_dir, "--keep", "label,caption")
    assert result.exit_code == 0, result.output
    table = pq.read_table(out).sort_by("key")
    assert table.column("key").to_pylist() == sorted(images)
    assert table.column("label").to_pylist() == [0, 0, 0, 1, 1, 1]
    assert table.column("caption").to_pylist() == [f"a picture of {key}" for key in sorted(images)]
    assert (table.schema.field("label").type, table.schema.field("caption").type) == (pa.int64(), pa.string())
    assert len(list(out.glob("part-train-0000*-of-00002-*.parquet"))) == 2


def test_the_same_images_in_three_forms_give_the_same_codes(model_dir, tmp_path):
    images = class_images(per_class=4)
    folder = write_image_folder(tmp_path / "folder", images)
    shards = tmp_path / "shards"
    shards.mkdir()
    keys = list(images)
    for i in range(2):
        write_shard(shards / f"s-{i}.tar", [{"__key__": key, "png": images[key]} for key in keys[i::2]])
    hf = write_hf_parquet(tmp_path / "hf", images)
    expected = reference_codes(model_dir, images)
    reports = {}
    for name, source in (("folder", folder), ("shards", shards), ("parquet", hf)):
        out = tmp_path / f"{name}.parquet"
        result = invoke("encode", source, out, "--model", model_dir, "--num-workers", "1", "--batch-size", "3")
        assert result.exit_code == 0, result.output
        got, codes = read_codes(out)
        assert sorted(got) == sorted(images), name
        for key, grid in zip(got, codes, strict=True):
            assert np.array_equal(grid, expected[key]), (name, key)
        report = invoke("eval", model_dir, source, "--json", "--num-workers", "0")
        assert report.exit_code == 0, report.output
        reports[name] = json.loads(report.output)
    assert reports["folder"]["images"] == len(images)
    for name in ("psnr", "ssim", "usage", "bits_per_code"):  # vqtok eval sees the same images in every form
        assert reports["folder"][name] == pytest.approx(reports["shards"][name]) == reports["parquet"][name], name


def test_a_killed_folder_encode_reruns_to_every_file_once_and_refuses_a_changed_listing(model_dir, tmp_path):
    images = class_images([f"c{i:02d}" for i in range(40)], per_class=4)
    root = write_image_folder(tmp_path / "photos", images)
    out = tmp_path / "tokens.parquet"
    command = [sys.executable, "-m", "vqtok", "encode", str(root), str(out), "--model", model_dir]
    command += ["--num-workers", "0", "--batch-size", "2", "--files-per-part", "4"]
    done_before = kill_when(command, lambda: len(list((out / STATS_DIR).glob("*.json"))), 3)
    assert 3 <= done_before < 40, "the run was not killed mid-way"
    keys, _ = read_codes(out, partial=True)
    assert len(keys) % 4 == 0 and len(keys) == len(set(keys))  # whole slices only

    (root / "c00" / "late.png").write_bytes(image_bytes(random_image(99)))  # shifts every slice after it
    refused = invoke("encode", root, out, "--model", model_dir, "--files-per-part", "4")
    assert refused.exit_code == 1 and "Traceback" not in refused.output
    assert f"{root} changed since this token dataset was started (160 files -> 161)" in refused.output
    assert "--overwrite" in refused.output
    (root / "c00" / "late.png").unlink()

    result = invoke("encode", root, out, "--model", model_dir, "--files-per-part", "4", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    assert f"{40 - done_before} encoded, {done_before} already done" in result.output
    keys, _ = read_codes(out)
    assert sorted(keys) == sorted(images) and len(read_errors(out)) == 0
    other_cut = invoke("encode", root, out, "--model", model_dir, "--files-per-part", "5")  # other slices, other names
    assert (
        other_cut.exit_code == 1 and "was cut into parts of 4 files, not 5: give --files-per-part 4" in other_cut.output
    )

    (root / "c00" / "late.png").write_bytes(image_bytes(random_image(99)))
    result = invoke("encode", root, out, "--model", model_dir, "--files-per-part", "4", "--overwrite")
    assert result.exit_code == 0, result.output
    assert "41 encoded, 0 already done" in result.output  # started again: 161 files in 41 slices
    assert sorted(read_codes(out)[0]) == sorted([*images, "c00/late"])
    assert json.loads((out / SETTINGS_NAME).read_text())["listings"][str(root)]["files"] == 161


# ---------------------------------------------------------------------------------------------- fit


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_fit_reads_a_folder_and_a_parquet_dataset(tmp_path):
    images = class_images(per_class=6)
    folder = write_image_folder(tmp_path / "folder", images)
    hf = write_hf_parquet(tmp_path / "hf", images)
    out = tmp_path / "run"
    args = ["fit", folder, "--out", out, "--val", hf, "--hidden", "8", "--codebook-size", "8", "--code-dim", "4"]
    result = invoke(*args, "--image-size", "16", "--batch-size", "4", "--steps", "2", "--num-workers", "0")
    assert result.exit_code == 0, result.output
    final = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["images"] for m in final if m["split"] == "val"] == [12]  # every row of the Parquet dataset
