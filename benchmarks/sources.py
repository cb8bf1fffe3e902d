"""Throughput of `vqtok encode` from where users keep images: a folder of JPEGs against the same JPEGs in
WebDataset shards, and shards in an S3 bucket against shards on the local disk.

Input: the JPEGs of benchmarks/encode.py (256-512 px, cut from scikit-image's photographs), tokenized at 64 px
by the paper's network (128 hidden channels, K = 512, D = 64), every run the whole `vqtok encode` command,
start-up included, with its defaults (2 decoding workers, batch 256):

- shards: 500 JPEGs a shard on the local disk, tokens on the local disk;
- folder: the same JPEGs as files in ten class folders, read in slices of 500 files (the shards' size, so that
  both give the two workers the same units) and of the default 1,000;
- S3: the same shards in a bucket of a local S3 server (moto's, started here on 127.0.0.1), tokens written
  into the bucket, against the local run. moto is a Python server in this process, on the same cores as the
  encoder: a real store answers from elsewhere, with a network's latency instead.

    pip install -e '.[bench]'
    python benchmarks/sources.py [--images 3000] [--repeats 2] [--out runs/sources_bench]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from encode import SIZE, make_jpegs, make_model, timed, write_shards  # noqa: E402


def write_folder(jpegs: list[bytes], folder: Path) -> None:
    for i, data in enumerate(jpegs):
        path = folder / f"class{i % 10}" / f"img{i:07d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def start_s3() -> tuple[object, str]:
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ACCESS_KEY_ID="bench",
        AWS_SECRET_ACCESS_KEY="bench",
        AWS_DEFAULT_REGION="us-east-1",
        AWS_ENDPOINT_URL=endpoint,  # the encode subprocesses inherit it, as a MinIO user's would
        AWS_EC2_METADATA_DISABLED="true",
    )
    return server, endpoint


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=2, help="runs of each; the fastest is reported")
    parser.add_argument("--out", type=Path, default=Path("runs/sources_bench"))
    parser.add_argument("--skip-s3", action="store_true")
    args = parser.parse_args()

    shutil.rmtree(args.out, ignore_errors=True)
    jpegs = make_jpegs(args.images)
    write_shards(jpegs, args.out / "shards")
    write_folder(jpegs, args.out / "folder")
    model_dir = make_model(jpegs, args.out)
    n = len(jpegs)
    print(f"{n} JPEGs ({sum(map(len, jpegs)) / n / 1024:.0f} KiB each), {os.cpu_count()} cores")

    def encode(source: str, out: str, *options: str) -> float:
        command = [sys.executable, "-m", "vqtok", "encode", source, out, "--model", model_dir]
        command += ["--image-size", str(SIZE), *options]
        best = float("inf")
        for _ in range(args.repeats):
            if "://" not in out:
                shutil.rmtree(out, ignore_errors=True)
            best = min(best, timed([*command, "--overwrite"]))
        return best

    rows = {
        "shards, local disk": encode(str(args.out / "shards"), str(args.out / "shards.parquet")),
        "folder, 500 files a part": encode(
            str(args.out / "folder"), str(args.out / "folder.parquet"), "--files-per-part", "500"
        ),
        "folder, 1,000 a part (default)": encode(str(args.out / "folder"), str(args.out / "folder-1000.parquet")),
    }
    if not args.skip_s3:
        import s3fs

        server, endpoint = start_s3()
        try:
            fs = s3fs.S3FileSystem()
            fs.mkdir("bench")
            fs.put(f"{args.out / 'shards'}/", "bench/shards/", recursive=True)
            rows["shards, S3 to S3 (moto)"] = encode("s3://bench/shards/", "s3://bench/tokens.parquet")
        finally:
            server.stop()

    base = rows["shards, local disk"]
    print(f"\n{'':<32} {'seconds':>8} {'images/s':>9} {'vs shards':>9}")
    for name, seconds in rows.items():
        print(f"{name:<32} {seconds:8.1f} {n / seconds:9.1f} {base / seconds:9.2f}")
    print(
        f"\nfolder of JPEGs: {base / rows['folder, 500 files a part']:.2f} of the shards' images/s at the same unit "
        f"size (target >= 0.9), {base / rows['folder, 1,000 a part (default)']:.2f} at the default"
    )
    if "shards, S3 to S3 (moto)" in rows:
        print(
            f"S3 (local moto server) to S3: {base / rows['shards, S3 to S3 (moto)']:.2f} of the local disk's images/s"
        )


if __name__ == "__main__":
    main()
