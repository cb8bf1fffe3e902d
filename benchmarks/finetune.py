"""Fine-tuning a tokenizer on photographs it never saw, at equal wall time: `vqtok fit --init` against training
the same network from scratch, with the parent as it is and a decoder-only fine-tune beside them.

The photographs are fit_quality.py's twenty, in its four groups. The parent is the VQGAN network of
pipelines/vqgan-cpu-small.toml (32x32 crops -> 8x8 codes, K = 128) fitted on crops of groups 0 and 1. The new
domain is groups 2 and 3: fold 0 fine-tunes on crops of group 2 and is evaluated on crops of group 3, fold 1
the other way round, so every evaluation is on photographs neither the parent nor the fine-tune trained on.
Each setting gets the same wall time, a share (`--budget-share`, a tenth) of the parent's whole `vqtok fit`:

- parent: the parent as it is (`vqtok eval`);
- init: `vqtok fit --init PARENT` (every weight trains);
- decoder: `vqtok fit --init PARENT --train decoder` (the codes stay the parent's: checked on the held-out crops);
- scratch: the same network and recipe from a new initialisation.

The cost part (`--cost`, also run after the comparison) trains the same network on the same crops for
`--cost-steps` steps with pipelines/vqgan-cpu-small.toml (the pixel MSE and the quantizer's loss) and with
pipelines/vqgan-cpu-small-gan.toml (plus LPIPS, the PatchGAN with the adaptive weight, the EMA) with its
discriminator playing from the first step: steps/s between the first and the last log, and the peak resident
memory of the fit's process (VmHWM, its decoding worker apart). LPIPS runs on random
weights in its files' layout unless --vgg16-weights and --lpips-weights name real ones: a cost does not depend
on their values.

A budget is spent as steps (the learning-rate schedule needs its length in advance): a probe fit of each setting
measures its seconds per step and the rest of the command's cost, and each run takes the steps that fill the
budget. PSNR is the fit's own held-out evaluation (over all pixels, as benchmarks/fit_quality.py reports it).
Runs are appended to `--results`; the table reads them, so parts can be run apart:

    pip install -e '.[bench]'
    python benchmarks/finetune.py                      # the parent, then 2 folds x 2 seeds of each setting
    python benchmarks/finetune.py --table-only
    python benchmarks/finetune.py --cost               # the cost part alone
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from fit_quality import GROUPS, crops, write_shard  # noqa: E402  (the same photographs and crops)
from gpu import random_lpips_files  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "pipelines" / "vqgan-cpu-small.toml"
GAN_RECIPE = ROOT / "pipelines" / "vqgan-cpu-small-gan.toml"  # the same network, with the full objective
SETTINGS = {"init": ["--init", "{parent}"], "decoder": ["--init", "{parent}", "--train", "decoder"], "scratch": []}
TARGET_DB = 1.0  # init must beat scratch by more than this at the budget


def fit(train: Path, val: Path, out: Path, steps: int, seed: int, extra: list[str]) -> dict:
    """The whole `vqtok fit` command, timed: its held-out evaluation and the rate it logged."""
    if out.exists():
        shutil.rmtree(out)
    command = [sys.executable, "-m", "vqtok", "fit", str(train), "--val", str(val), "--out", str(out)]
    command += ["--config", str(RECIPE), "--steps", str(steps), "--seed", str(seed), "--eval-every", str(10**9)]
    command += extra
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    entries = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [(m["step"], m["images_per_second"]) for m in entries if "images_per_second" in m]
    return {**[m for m in entries if m["split"] == "val"][-1], "seconds": seconds, "log": logged}


def probe(train: Path, val: Path, out: Path, steps: int, extra: list[str], batch: int) -> dict:
    """A short fit: its seconds per step between the first and last logged steps (the recipe logs every 50), and
    the rest of its cost."""
    run = fit(train, val, out, steps, 0, extra)
    (first, first_rate), (last, last_rate) = run["log"][0], run["log"][-1]
    per_step = (last * batch / last_rate - first * batch / first_rate) / (last - first)
    return {"seconds_per_step": per_step, "fixed_seconds": run["seconds"] - steps * per_step}


def high_water_mib(pid: int) -> float:
    """A process's peak resident memory so far (VmHWM), 0 once it is gone. Not wait4's ru_maxrss: Linux carries
    the high-water mark of the process that forked it across the exec, so every fit would report at least this
    benchmark's own peak."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next((int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmHWM:")), 0.0)


def objective_cost(train: Path, out: Path, steps: int, lpips: list[str]) -> list[dict]:
    """Steps/s and peak memory of the pixel loss alone and of the full objective, on the same network and crops."""
    runs = []
    for name, recipe, extra in (
        ("pixel", RECIPE, []),
        ("full objective", GAN_RECIPE, ["--disc-start", "0", *lpips]),
    ):
        run_out = out / f"cost-{name.replace(' ', '-')}"
        if run_out.exists():
            shutil.rmtree(run_out)
        # the recipe, logging ten times in the run (fit has no option for it): [train] is its last table
        text = recipe.read_text()
        assert text.rindex("[train]") == text.rindex("\n[") + 1 and "log_every" not in text
        logged = out / f"cost-{recipe.name}"
        logged.write_text(f"{text.rstrip()}\nlog_every = {max(1, steps // 10)}\n")
        command = [sys.executable, "-m", "vqtok", "fit", str(train), "--out", str(run_out), "--config", str(logged)]
        command += ["--steps", str(steps), "--eval-every", str(10**9), "--save-every", str(10**9), *extra]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        peak = 0
        while process.poll() is None:
            peak = max(peak, high_water_mib(process.pid))
            time.sleep(0.1)
        if process.returncode:
            raise SystemExit(f"{' '.join(command)} exited {process.returncode}")
        entries = [json.loads(line) for line in (run_out / "metrics.jsonl").read_text().splitlines()]
        logs = [m for m in entries if "images_per_second" in m]
        first, last = logs[0], logs[-1]
        # each log's rate counts from the start: step / rate is its time in seconds per image of a step
        seconds = last["step"] / last["images_per_second"] - first["step"] / first["images_per_second"]
        per_image = seconds / (last["step"] - first["step"])
        runs.append({"what": name, "per_image_seconds": per_image, "peak_rss_mib": peak})
    return runs


def cost_table(runs: list[dict], batch: int) -> None:
    pixel = runs[0]["per_image_seconds"]
    print(f"cost, batch {batch}: what | steps/s | x the pixel loss's time | peak RSS")
    for run in runs:
        steps_per_second = 1 / (run["per_image_seconds"] * batch)
        ratio = run["per_image_seconds"] / pixel
        print(f"{run['what']:>15} | {steps_per_second:7.2f} | {ratio:5.2f}x | {run['peak_rss_mib']:6.0f} MiB")


def codes_kept(parent: Path, child: Path, pixels) -> bool:
    """Whether the child gives every held-out crop the parent's codes."""
    import torch

    from vqtok.tokenizers import load_tokenizer

    images = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 255  # (N, 3, 32, 32) in [0, 1]
    return bool(torch.equal(load_tokenizer(parent).encode(images), load_tokenizer(child).encode(images)))


def held_out_psnr(model: Path, val: Path) -> float:
    done = subprocess.run(
        [sys.executable, "-m", "vqtok", "eval", str(model), str(val), "--json", "--num-workers", "0"],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout)["psnr"]


def table(records: list[dict]) -> None:
    """Each setting's PSNR per fold and seed, the mean with its spread, and init's gain over scratch; then the
    latest cost figures."""
    costs = [r for r in records if r["setting"] == "cost"]
    records = [r for r in records if r["setting"] != "cost"]
    by = {(r["setting"], r["fold"], r["seed"]): r for r in records}  # the latest of each
    folds = sorted({r["fold"] for r in records})
    seeds = sorted({r["seed"] for r in records if r["setting"] != "parent"})
    print("fold seed |  parent    init  decoder  scratch | steps init/decoder/scratch | codes kept")
    for fold in folds:
        for seed in seeds:
            row = [by.get((name, fold, seed if name != "parent" else 0)) for name in ("parent", *SETTINGS)]
            psnrs = "  ".join(f"{r['psnr']:6.2f}" if r else "     -" for r in row)
            steps = "/".join(str(r["steps"]) if r else "-" for r in row[1:])
            kept = row[2]["codes_kept"] if row[2] else "-"
            print(f"{fold:<4} {seed:<4} | {psnrs} | {steps:>26} | {kept}")
    gains = [
        by[("init", f, s)]["psnr"] - by[("scratch", f, s)]["psnr"]
        for f in folds
        for s in seeds
        if ("init", f, s) in by and ("scratch", f, s) in by
    ]
    for name in ("parent", *SETTINGS):
        values = [r["psnr"] for (n, _, _), r in by.items() if n == name]
        if values:
            spread = (max(values) - min(values)) / 2
            print(f"{name:>8}: {statistics.mean(values):.2f} dB mean +- {spread:.2f} (half-range), {len(values)} runs")
    if len(gains) >= 2:
        mean, error = statistics.mean(gains), statistics.stdev(gains) / math.sqrt(len(gains))
        verdict = "met" if mean > TARGET_DB else "not met"
        print(
            f"init over scratch: {mean:+.2f} +- {error:.2f} dB over {len(gains)} fold-seed pairs; "
            f"more than {TARGET_DB} dB: {verdict}"
        )
    if costs:
        cost_table(costs[-1]["runs"], costs[-1]["batch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--parent-steps", type=int, default=2000, help="The parent's steps on groups 0 and 1.")
    parser.add_argument("--budget-share", type=float, default=0.1, help="Each setting's share of the parent's time.")
    parser.add_argument("--folds", default="0,1")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--probe-steps", type=int, default=100)
    parser.add_argument("--crops", type=int, default=400, help="Crops per photograph, for training and held out.")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune"))
    parser.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results" / "finetune.jsonl")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--cost", action="store_true", help="Measure the cost part alone.")
    parser.add_argument("--cost-steps", type=int, default=200)
    parser.add_argument("--vgg16-weights", type=Path, help="LPIPS's VGG16 file; default: random weights")
    parser.add_argument("--lpips-weights", type=Path, help="LPIPS's vgg.pth; default: random weights")
    args = parser.parse_args()
    if args.table_only:
        table([json.loads(line) for line in args.results.read_text().splitlines()])
        return

    import tomllib

    batch = tomllib.loads(RECIPE.read_text())["train"]["batch_size"]
    assert tomllib.loads(GAN_RECIPE.read_text())["model"] == tomllib.loads(RECIPE.read_text())["model"]
    out = args.out
    out.mkdir(parents=True, exist_ok=True)

    def record(entry: dict) -> None:
        facts = {"machine": platform.processor() or platform.machine(), "when": time.strftime("%Y-%m-%d %H:%M")}
        args.results.parent.mkdir(parents=True, exist_ok=True)
        with args.results.open("a") as f:
            f.write(json.dumps({**entry, **facts}) + "\n")

    def measure_cost(train: Path) -> None:
        if args.vgg16_weights and args.lpips_weights:
            vgg16, linear = args.vgg16_weights, args.lpips_weights
        else:
            vgg16, linear = random_lpips_files(out / "lpips-random")
        lpips = ["--vgg16-weights", str(vgg16), "--lpips-weights", str(linear)]
        runs = objective_cost(train, out, args.cost_steps, lpips)
        record({"setting": "cost", "batch": batch, "steps": args.cost_steps, "runs": runs})
        cost_table(runs, batch)

    shards = {}
    for name, photos, seed in (("parent", (*GROUPS[0], *GROUPS[1]), 0), ("g2", GROUPS[2], 1), ("g3", GROUPS[3], 2)):
        pixels = crops(photos, args.crops, seed=seed)
        write_shard(out / f"{name}.tar", pixels, name)
        shards[name] = (out / f"{name}.tar", pixels)
    folds = {0: ("g2", "g3"), 1: ("g3", "g2")}  # (fine-tuned on, held out)
    if args.cost:
        measure_cost(shards["g2"][0])
        return

    parent_run = fit(shards["parent"][0], shards["g3"][0], out / "parent", args.parent_steps, 0, [])
    parent = out / "parent" / "model"
    budget = args.budget_share * parent_run["seconds"]
    print(f"parent: {args.parent_steps} steps in {parent_run['seconds']:.0f} s; each setting gets {budget:.0f} s")
    for fold in (int(f) for f in args.folds.split(",")):
        tune, held = folds[fold]
        record(
            {"setting": "parent", "fold": fold, "seed": 0, "steps": 0, "psnr": held_out_psnr(parent, shards[held][0])}
        )
    steps = {}
    for name, extra in SETTINGS.items():
        extra = [a.format(parent=parent) for a in extra]
        cost = probe(shards["g2"][0], shards["g3"][0], out / f"probe-{name}", args.probe_steps, extra, batch)
        steps[name] = max(1, int((budget - cost["fixed_seconds"]) / cost["seconds_per_step"]))
        print(f"{name}: {cost['seconds_per_step'] * 1000:.0f} ms a step, {steps[name]} steps in the budget")
    for fold in (int(f) for f in args.folds.split(",")):
        tune, held = folds[fold]
        for seed in (int(s) for s in args.seeds.split(",")):
            for name, extra in SETTINGS.items():
                extra = [a.format(parent=parent) for a in extra]
                run_out = out / f"{name}-f{fold}-s{seed}"
                run = fit(shards[tune][0], shards[held][0], run_out, steps[name], seed, extra)
                entry = {"setting": name, "fold": fold, "seed": seed, "steps": steps[name], "psnr": run["psnr"]}
                entry |= {"seconds": run["seconds"], "budget": budget, "parent_seconds": parent_run["seconds"]}
                if name == "decoder":
                    entry["codes_kept"] = codes_kept(parent, run_out / "model", shards[held][1])
                record(entry)
                print(f"fold {fold} seed {seed} {name}: {run['psnr']:.2f} dB in {run['seconds']:.0f} s")
    measure_cost(shards["g2"][0])
    table([json.loads(line) for line in args.results.read_text().splitlines()])


if __name__ == "__main__":
    main()
