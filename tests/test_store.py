"""The token Parquet format: writing, committing, reading back, and refusing what does not fit."""

import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vqtok.errors import StoreError
from vqtok.tokens import TokenSettings, TokenStore, read_codes, read_errors, read_metadata
from vqtok.tokens.format import ERRORS_DIR, SUCCESS_NAME, codes_array, part_name
from vqtok.tokens.writer import completion


def settings(**changes) -> TokenSettings:
    base = {"model_id": "abc", "codebook_size": 512, "grid": (4, 3), "image_size": 16, "preprocessing": "crop"}
    return TokenSettings(**{**base, **changes})


def write(out, shards, s=None, rows=5, seed=0):
    """Write `rows` random grids per shard; returns {shard: codes}."""
    s = s or settings()
    store = TokenStore(out, s)
    store.open(shards, shards)
    rng = np.random.default_rng(seed)
    written = {}
    for shard in shards:
        codes = rng.integers(0, s.codebook_size, (rows, *s.grid))
        writer = store.writer(shard)
        writer.add(
            [f"{shard}/{i}" for i in range(rows)], codes, {name: [str(i) for i in range(rows)] for name in s.keep}
        )
        writer.add_errors([("broken", "not an image")])
        writer.commit({"status": "done"})
        written[shard] = codes
    store.finish(shards)
    return written


def test_round_trip_keeps_keys_codes_and_metadata(tmp_path):
    out = tmp_path / "tokens.parquet"
    written = write(out, ["a.tar", "b.tar"], settings(keep=("txt",)))
    keys, codes = read_codes(out)
    order = sorted(["a.tar", "b.tar"], key=part_name)
    assert keys == [f"{shard}/{i}" for shard in order for i in range(5)]
    assert np.array_equal(codes, np.concatenate([written[shard] for shard in order]))
    assert codes.dtype == np.int64 and codes.shape == (10, 4, 3)

    table = pq.read_table(out / f"{part_name('a.tar')}.parquet")
    assert table.schema.field("codes").type == pa.list_(pa.list_(pa.uint16(), 3), 4)
    assert table.column("shard").to_pylist() == ["a.tar"] * 5
    assert table.column("txt").to_pylist() == [str(i) for i in range(5)]
    meta = read_metadata(out)
    assert (meta["codebook_size"], meta["grid"], meta["model_id"], meta["image_size"]) == (512, [4, 3], "abc", 16)
    assert "vqtok_version" in meta and meta["format_version"] == 1

    assert read_errors(out).to_pylist() == [
        {"key": "broken", "shard": shard, "reason": "not an image"}
        for shard in sorted(["a.tar", "b.tar"], key=part_name)
    ]
    assert json.loads((out / SUCCESS_NAME).read_text())["rows"] == 10
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def test_codes_above_uint16_are_int32(tmp_path):
    out = tmp_path / "big.parquet"
    written = write(out, ["a.tar"], settings(codebook_size=70_000))
    assert pq.read_schema(next(out.glob("part-*.parquet"))).field("codes").type.value_type.value_type == pa.int32()
    assert np.array_equal(read_codes(out)[1], written["a.tar"])


def test_compression_stores_codes_near_their_entropy(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(512))
    codes = rng.choice(512, size=(4000, 8, 8), p=probabilities)
    store = TokenStore(tmp_path / "t", settings(grid=(8, 8)))
    store.open(["s"], ["s"])
    writer = store.writer("s")
    writer.add([""] * len(codes), codes)  # empty keys: measure the codes alone
    writer.commit({"status": "done"})
    counts = np.bincount(codes.ravel(), minlength=512)
    p = counts[counts > 0] / counts.sum()
    entropy_bytes = -(p * np.log2(p)).sum() * codes.size / 8
    size = (tmp_path / "t" / f"{part_name('s')}.parquet").stat().st_size
    assert size < 1.15 * entropy_bytes, size / entropy_bytes


def test_uncommitted_shard_is_invisible_and_not_done(tmp_path):
    out = tmp_path / "t"
    store = TokenStore(out, settings())
    store.open(["a.tar"], ["a.tar"])
    writer = store.writer("a.tar")
    writer.add(["k"], np.zeros((1, 4, 3), int))
    assert completion(out).parts == () and not store.done("a.tar")
    writer.abort()
    assert not list(out.glob(".*"))


def test_other_settings_are_refused_unless_overwrite(tmp_path):
    out = tmp_path / "t"
    write(out, ["a.tar"])
    with pytest.raises(StoreError, match="other settings.*model_id 'abc' -> 'xyz'.*--overwrite"):
        TokenStore(out, settings(model_id="xyz")).open(["a.tar"], ["a.tar"])
    store = TokenStore(out, settings(model_id="xyz"))
    store.open(["b.tar"], ["b.tar"], overwrite=True, tidy=True)
    assert completion(out).parts == () and not (out / SUCCESS_NAME).exists()
    assert not list((out / ERRORS_DIR).iterdir())


def test_a_folder_that_is_not_a_token_dataset_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "part-00000.parquet").write_text("a Spark job's output")
    for overwrite in (False, True):
        with pytest.raises(StoreError, match="not empty and is not a vqtok token dataset"):
            TokenStore(tmp_path, settings()).open(["a.tar"], ["a.tar"], overwrite=overwrite, tidy=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt", "part-00000.parquet"]


def test_overwrite_removes_markers_before_data_and_spares_other_processes_shards(tmp_path):
    out = tmp_path / "t"
    write(out, ["a.tar", "b.tar"])
    store = TokenStore(out, settings(model_id="new"))
    store.open(["a.tar", "b.tar"], ["a.tar"], overwrite=True, tidy=True)  # this process has a.tar only
    assert not store.done("a.tar") and not (out / f"{part_name('a.tar')}.parquet").exists()
    assert (out / f"{part_name('b.tar')}.parquet").exists()  # b.tar is another process's to replace


def test_a_marker_without_its_data_is_not_done(tmp_path):
    out = tmp_path / "t"
    write(out, ["a.tar"])
    (out / f"{part_name('a.tar')}.parquet").unlink()
    assert not TokenStore(out, settings()).done("a.tar")


def test_codes_array_reads_variable_size_lists_from_other_writers(tmp_path):
    grids = np.arange(24).reshape(2, 3, 4)
    path = tmp_path / "prior.parquet"
    pd.DataFrame({"key": ["x", "y"], "codes": [[list(row) for row in grid] for grid in grids]}).to_parquet(path)
    keys, codes = read_codes(path)
    assert keys == ["x", "y"] and np.array_equal(codes, grids)


@pytest.mark.parametrize(
    "column, message",
    [
        (pa.array([[[1, 2], [3, 4]], [[1, 2], [3]]]), "differ in shape"),
        (pa.array([[1, 2], [3, 4]]), r"\(h, w\) grids of integers"),
        (pa.array([[[1.0]], [[2.0]]]), r"\(h, w\) grids of integers"),
        (pa.array([[[1]], None]), "nulls"),
    ],
    ids=["ragged", "one level", "floats", "null row"],
)
def test_codes_array_refuses_what_is_not_a_grid(column, message):
    with pytest.raises(StoreError, match=message):
        codes_array(column)


def test_part_names_are_readable_and_unique():
    assert part_name("/data/train-000001.tar").startswith("part-train-000001-")
    assert part_name("/a/x.tar") != part_name("/b/x.tar")
    assert part_name("pipe:curl -s https://h/x y.tar").startswith("part-x_y-")


def test_token_dataset_streams_every_row_once_across_ranks_and_workers(tmp_path):
    from torch.utils.data import DataLoader

    from vqtok.tokens import TokenDataset

    out = tmp_path / "t"
    write(out, [f"{i}.tar" for i in range(5)], settings(keep=("txt",)))
    keys, codes = read_codes(out)
    expected = dict(zip(keys, codes, strict=True))
    seen = []
    for rank in range(2):
        dataset = TokenDataset(out, columns=["txt"], shuffle=True, rank=rank, world_size=2)
        for batch in DataLoader(dataset, batch_size=4, num_workers=2):
            assert batch["codes"].dtype == torch.int64 and batch["codes"].shape[1:] == (4, 3)
            for key, grid, txt in zip(batch["key"], batch["codes"], batch["txt"], strict=True):
                assert np.array_equal(grid.numpy(), expected[key]) and key.endswith(f"/{txt}")
                seen.append(key)
    assert sorted(seen) == sorted(keys)


def test_token_dataset_shuffles_anew_each_epoch(tmp_path):
    from vqtok.tokens import TokenDataset

    out = tmp_path / "t"
    write(out, [f"{i}.tar" for i in range(5)])
    dataset = TokenDataset(out, shuffle=True, seed=3)
    first, again = [row["key"] for row in dataset], [row["key"] for row in dataset]
    dataset.set_epoch(1)
    second = [row["key"] for row in dataset]
    assert first == again and first != second and sorted(first) == sorted(second) == sorted(read_codes(out)[0])
    assert [row["key"] for row in TokenDataset(out)] == read_codes(out)[0]  # no shuffle: file order


def test_token_dataset_gives_every_process_rows_of_a_single_row_group_and_repeats(tmp_path):
    from vqtok.tokens import TokenDataset

    out = tmp_path / "t"
    write(out, ["only.tar"], settings(keep=("txt",)), rows=7)
    seen = []
    for rank in range(3):  # one row group, three processes: each gets a slice of it
        dataset = TokenDataset(out, columns=["txt"], rank=rank, world_size=3)
        rows = list(dataset)
        assert len(rows) == dataset.rows in (2, 3)
        seen += [row["key"] for row in rows]
    assert sorted(seen) == sorted(read_codes(out)[0])
    endless = iter(TokenDataset(out, shuffle=True, repeat=True))
    first, second = [next(endless)["key"] for _ in range(7)], [next(endless)["key"] for _ in range(7)]
    assert sorted(first) == sorted(second) == sorted(seen) and first != second  # a new order each pass


def test_token_set_reads_several_datasets_as_one_and_refuses_two_tokenizers(tmp_path):
    from vqtok.tokens import TokenSet

    write(tmp_path / "a", ["1.tar", "2.tar"])
    write(tmp_path / "b", ["3.tar"], seed=1)
    part = next((tmp_path / "a").glob("part-*.parquet"))
    tokens = TokenSet([tmp_path / "a", tmp_path / "b", part])  # a part of a named folder is read once
    assert tokens.rows == 15 and len(tokens.units) == 3
    assert tokens.tokenizer()["model_id"] == "abc"
    with pytest.raises(StoreError, match="outside"):
        tokens.check_codes(100)
    with pytest.raises(StoreError, match="the codes were made by model abc, not by this one"):
        tokens.check_tokenizer("xyz", 512, lambda size: (4, 3))

    write(tmp_path / "c", ["4.tar"], settings(model_id="other"))
    with pytest.raises(StoreError, match=r"hold codes of different tokenizers \(model_id abc vs other\)"):
        TokenSet([tmp_path / "a", tmp_path / "c"])
    pd.DataFrame({"key": ["x"], "codes": [[[1, 2, 3]] * 4]}).to_parquet(tmp_path / "plain.parquet")
    assert TokenSet([tmp_path / "a", tmp_path / "plain.parquet"]).rows == 11  # grids without metadata pass
    with pytest.raises(StoreError, match="no vqtok metadata says which tokenizer"):
        TokenSet(tmp_path / "plain.parquet").tokenizer()
    with pytest.raises(StoreError, match="no 'cls' column"):
        TokenSet(tmp_path / "a", columns=["cls"])


# ---------------------------------------------------------------------------------------------- unfinished datasets


def write_part_of(out, shards, done: int) -> dict:
    """A run over `shards` that committed only the first `done`, as a killed encode leaves it."""
    store = TokenStore(out, settings())
    store.open(shards, shards)
    rng = np.random.default_rng(0)
    written = {}
    for shard in shards[:done]:
        written[shard] = rng.integers(0, 512, (3, 4, 3))
        writer = store.writer(shard)
        writer.add([f"{shard}/{i}" for i in range(3)], written[shard])
        writer.commit({})
    return written


def test_readers_that_train_refuse_an_unfinished_dataset_in_one_line(tmp_path):
    from vqtok.tokens import TokenDataset, TokenSet, UnfinishedDataset

    out = tmp_path / "t"
    written = write_part_of(out, ["a.tar", "b.tar", "c.tar", "d.tar"], done=2)
    assert json.loads((out / "_vqtok.json").read_text())["planned_shards"] == 4
    for read in (read_codes, TokenSet, TokenDataset):
        with pytest.raises(UnfinishedDataset) as refused:
            read(out)
        message = str(refused.value)
        assert "\n" not in message and message.startswith(f"{out} is unfinished: 2 of 4 shards done. Run the ")
        assert message.endswith("or pass --partial (partial=True) to read its 2 committed parts only")
    keys, codes = read_codes(out, partial=True)
    order = sorted(written, key=part_name)
    assert keys == [f"{shard}/{i}" for shard in order for i in range(3)]
    assert np.array_equal(codes, np.concatenate([written[shard] for shard in order]))
    assert TokenSet(out, partial=True).unfinished[str(out)].done == 2
    assert sorted(row["key"] for row in TokenDataset(out, partial=True)) == sorted(keys)


def test_a_part_without_its_marker_is_never_read(tmp_path):
    from vqtok.tokens import UnfinishedDataset

    out = tmp_path / "t"
    write(out, ["a.tar", "b.tar"])
    stray = out / "part-zzz.parquet"  # whole, but not committed: a crash between the part and its marker
    stray.write_bytes((out / f"{part_name('a.tar')}.parquet").read_bytes())
    with pytest.raises(UnfinishedDataset, match="2 of 2 shards done, 1 part file without a commit marker"):
        read_codes(out)
    assert sorted(read_codes(out, partial=True)[0]) == sorted(f"{s}/{i}" for s in ("a.tar", "b.tar") for i in range(5))


def test_a_dataset_that_does_not_record_its_plan_says_how_many_are_done(tmp_path):
    from vqtok.tokens import UnfinishedDataset

    out = tmp_path / "t"
    write_part_of(out, ["a.tar", "b.tar", "c.tar"], done=1)
    recorded = json.loads((out / "_vqtok.json").read_text())
    del recorded["planned_shards"]  # as vqtok wrote it before the plan was recorded
    (out / "_vqtok.json").write_text(json.dumps(recorded))
    with pytest.raises(UnfinishedDataset, match=r"is unfinished: 1 shard done\. "):
        read_codes(out)
    assert len(read_codes(out, partial=True)[0]) == 3


def test_an_empty_unfinished_dataset_says_so(tmp_path):
    from vqtok.tokens import TokenSet

    out = tmp_path / "t"
    write_part_of(out, ["a.tar", "b.tar"], done=0)
    with pytest.raises(StoreError, match=r"is unfinished: 0 of 2 shards done\. Run the .* again to finish it$"):
        TokenSet(out)
    with pytest.raises(StoreError, match=r"no committed parts \(0 of 2 shards done\)"):
        TokenSet(out, partial=True)


@pytest.mark.parametrize("content", [b"\xff\xfe not text", b"{torn", b"[1, 2]"])
def test_a_settings_file_that_is_not_vqtoks_is_one_clear_refusal(tmp_path, content):
    out = tmp_path / "t"
    write(out, ["a.tar"])
    (out / "_vqtok.json").write_bytes(content)
    with pytest.raises(StoreError, match=r"_vqtok.json: not vqtok's settings \(.*\); use --overwrite"):
        TokenStore(out, settings()).open(["a.tar"], ["a.tar"])
    TokenStore(out, settings()).open(["a.tar"], ["a.tar"], overwrite=True, tidy=True)  # which replaces it
    assert json.loads((out / "_vqtok.json").read_text())["model_id"] == "abc"


def test_the_first_import_paths_still_reach_the_token_dataset_and_the_prior(tmp_path):
    """Users' scripts hold `vqtok.store.read_codes`, `vqtok.tokens.TokenDataset` and `vqtok.prior.Prior`."""
    import subprocess
    import sys

    write(tmp_path / "t", ["a.tar"])
    script = (
        "import sys; from vqtok.store import read_codes, TokenSet, summarize; from vqtok.tokens import TokenDataset; "
        "from vqtok.prior import Prior; import vqtok.prior.model, vqtok.tokens.reader; "
        "assert Prior is vqtok.prior.model.Prior and read_codes is vqtok.tokens.reader.read_codes; "
        "keys, codes = read_codes(sys.argv[1]); assert len(keys) == len(list(TokenDataset(sys.argv[1]))) == 5; "
        "assert summarize(sys.argv[1])['rows'] == 5 and TokenSet(sys.argv[1]).rows == 5"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "t")], check=True)  # a fresh interpreter


def test_reading_tokens_needs_no_torch(tmp_path):
    """The token format is read without torch: only TokenDataset imports it."""
    import subprocess
    import sys

    write(tmp_path / "t", ["a.tar"])
    script = (
        "import sys; from vqtok.tokens import read_codes, summarize, TokenSet; "
        "assert len(read_codes(sys.argv[1])[0]) == 5 and summarize(sys.argv[1])['rows'] == 5; "
        "assert 'torch' not in sys.modules, 'torch was imported'"
    )
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "t")], check=True)
