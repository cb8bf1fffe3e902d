"""How many threads the commands should run torch on: `vqtok encode` and `vqtok prior sample` on the CPU, with
the cores to themselves and with other work on them, under each thread setting.

The commands run as a user runs them (a subprocess each, start-up included) on the inputs of
benchmarks/encode.py (JPEGs of 256-512 px tokenized at 64 px by a 128-channel VQ-VAE, K = 512) and a prior of
the default shape over 16x16 grids (random weights: sampling costs the same), sampled 64 grids in batches of 64.
The settings: vqtok's own choice (no OMP_NUM_THREADS), and OMP_NUM_THREADS=1 and =N for each N up to the cores.
`--load K` adds K processes that keep one core busy each for the whole measurement, which is what a machine
shared with another job looks like; each row is the median of `--repeats` runs.

    python benchmarks/threads.py [--images 1000] [--loads 0,1,2] [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from encode import make_jpegs, make_model, write_shards  # noqa: E402  (the same inputs as the encode benchmark)

BUSY = "while True: pass"


def make_prior(folder: Path, tokenizer: str) -> str:
    import torch

    from vqtok.config import PriorConfig
    from vqtok.prior import Prior

    torch.manual_seed(0)
    prior = Prior(PriorConfig(grid=(16, 16), tokenizer=tokenizer, image_size=64))
    return str(prior.save_pretrained(folder / "prior"))


@contextmanager
def busy_cores(count: int):
    """`count` processes that each keep a core busy while the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(count)]
    try:
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def rate(command: list[str], threads: int | None, pattern: str) -> float:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
    found = re.search(pattern, done.stdout)
    if found is None:
        raise RuntimeError(f"no rate in the output of {' '.join(command)}:\n{done.stdout}")
    return float(found.group(1).replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--loads", default="0,1,2", help="Busy processes beside the command, comma-separated.")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("runs/threads_bench"))
    args = parser.parse_args()

    args.out.mkdir(parents=True, exist_ok=True)
    jpegs = make_jpegs(args.images)
    shards = write_shards(jpegs, args.out / "shards")
    model_dir = make_model(jpegs, args.out)
    from vqtok.tokenizers import load_tokenizer

    prior_dir = make_prior(args.out, load_tokenizer(model_dir).model_id)
    cores = len(os.sched_getaffinity(0))
    vqtok = [sys.executable, "-m", "vqtok"]
    commands = {
        "encode img/s": (
            [*vqtok, "encode", *shards, str(args.out / "tokens.parquet"), "--model", model_dir, "--overwrite"],
            r"([\d,.]+) images/s over",
        ),
        "prior sample codes/s": (
            [*vqtok, "prior", "sample", prior_dir, str(args.out / "samples.parquet"), "--n", "64", "--overwrite"],
            r"\(([\d,.]+) codes/s\)",
        ),
    }
    settings = {"vqtok's choice": None, **{f"OMP_NUM_THREADS={n}": n for n in range(1, cores + 1)}}
    import torch

    print(f"{cores} cores, {args.images} images, median of {args.repeats} runs; torch {torch.__version__}")
    print(f"{'busy cores beside':>18} {'setting':>18} " + " ".join(f"{name:>21}" for name in commands))
    for load in (int(n) for n in args.loads.split(",")):
        with busy_cores(load):
            for label, threads in settings.items():
                rates = [
                    statistics.median(rate(command, threads, pattern) for _ in range(args.repeats))
                    for command, pattern in commands.values()
                ]
                print(f"{load:>18} {label:>18} " + " ".join(f"{r:>21,.0f}" for r in rates), flush=True)


if __name__ == "__main__":
    main()
