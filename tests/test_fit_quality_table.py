"""benchmarks/fit_quality.py's table: the spread over seeds, the paired gain's standard error and the verdicts,
on made-up runs whose figures are chosen to make the arithmetic checkable by hand."""

import importlib.util
import math
import sys
from pathlib import Path

import pytest

PATH = Path(__file__).resolve().parent.parent / "benchmarks" / "fit_quality.py"


@pytest.fixture(scope="module")
def fit_quality():
    spec = importlib.util.spec_from_file_location("fit_quality", PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def runs(psnr: dict, seconds: float = 100.0, usage: float = 0.9) -> dict:
    return {key: {"psnr": p, "usage": usage, "perplexity": 200.0, "seconds": seconds} for key, p in psnr.items()}


# two folds x two seeds; gains 0.5, 0.3 on fold 0 and 0.6, 0.2 on fold 1
OURS = {(0, 0): 24.0, (0, 1): 24.2, (1, 0): 26.0, (1, 1): 25.6}
THEIRS = {(0, 0): 23.5, (0, 1): 23.9, (1, 0): 25.4, (1, 1): 25.4}


def test_spread_gain_and_standard_error(fit_quality):
    table = fit_quality.compare(runs(OURS, 90.0), runs(THEIRS), folds=[0, 1], seeds=[0, 1])
    fold0, fold1 = table["rows"]
    assert fold0["psnr"] == pytest.approx(24.1) and fold0["spread"] == pytest.approx(0.1)
    assert fold0["ref_psnr"] == pytest.approx(23.7) and fold0["ref_spread"] == pytest.approx(0.2)
    assert fold1["gain"] == pytest.approx(0.4) and fold1["spread"] == pytest.approx(0.2)
    mean = table["mean"]
    assert mean["runs"] == 4 and mean["psnr"] == pytest.approx(24.95) and mean["gain"] == pytest.approx(0.4)
    # the mean's spread: each seed's mean over the folds (25.0 and 24.9), half their range
    assert mean["spread"] == pytest.approx(0.05)
    gains = [0.5, 0.3, 0.6, 0.2]
    sd = math.sqrt(sum((g - 0.4) ** 2 for g in gains) / 3)
    assert mean["se"] == pytest.approx(sd / 2)
    assert mean["ratio"] == pytest.approx(0.9)
    verdicts = {name: status for name, (status, _) in table["verdicts"].items()}
    assert verdicts == {"gain": "met", "worst_fold": "met", "time": "met", "psnr": "met", "usage": "met"}


def test_verdicts_not_met(fit_quality):
    # fold 1 falls 0.5 dB behind with seed spreads of 0.2 and 0, and one run is slow
    ours = {**OURS, (1, 0): 25.1, (1, 1): 24.7}
    slow = runs(ours, 100.0)
    slow[(0, 1)]["seconds"] = 130.0
    table = fit_quality.compare(slow, runs(THEIRS, usage=0.95), folds=[0, 1], seeds=[0, 1])
    status = {name: status for name, (status, _) in table["verdicts"].items()}
    assert status == {
        "gain": "not met",
        "worst_fold": "not met",
        "time": "not met",
        "psnr": "not met",
        "usage": "not met",
    }
    assert table["verdicts"]["worst_fold"][1] == "fold 1: -0.50 dB, seed spread 0.20 dB"


def test_missing_runs_give_no_verdict(fit_quality):
    ours = runs({key: p for key, p in OURS.items() if key != (1, 1)})
    table = fit_quality.compare(ours, runs(THEIRS), folds=[0, 1], seeds=[0, 1])
    assert table["mean"]["runs"] == 3 and table["rows"][1]["spread"] is None  # fold 1 has one seed
    for status, detail in table["verdicts"].values():
        assert (status, detail) == ("not enough runs", "3 of 4 fold-seed pairs")
    one_seed = fit_quality.compare(runs(OURS), runs(THEIRS), folds=[0, 1], seeds=[0])
    assert one_seed["verdicts"]["worst_fold"] == ("not enough runs", "one seed: no spread")
    assert one_seed["verdicts"]["gain"][0] == "met"  # gains 0.5 and 0.6: mean 0.55, standard error 0.05


def test_latest_run_of_each_fold_and_seed_wins(fit_quality):
    stored = [
        {"who": "vqtok", "label": "defaults", "steps": 2000, "fold": 0, "seed": 0, "psnr": 1.0},
        {"who": "vqtok", "label": "defaults", "steps": 1000, "fold": 0, "seed": 0, "psnr": 2.0},
        {"who": "vqtok", "label": "defaults", "steps": 2000, "fold": 0, "seed": 0, "psnr": 3.0},
        {"who": "light", "label": "defaults", "steps": 2000, "fold": 0, "seed": 0, "psnr": 4.0},
    ]
    chosen = fit_quality.latest(stored, who="vqtok", label="defaults", steps=2000)
    assert list(chosen) == [(0, 0)] and chosen[(0, 0)]["psnr"] == 3.0


def test_budget_becomes_steps(fit_quality):
    assert fit_quality.steps_for_budget(500.0, {"fixed_seconds": 20.0, "seconds_per_step": 0.25}) == 1920


def test_equal_time_gives_the_slower_setting_fewer_steps(fit_quality):
    baseline = {"fixed_seconds": 15.0, "seconds_per_step": 0.1}  # 2,000 steps: 215 s
    wider = {"fixed_seconds": 17.0, "seconds_per_step": 0.125}
    assert fit_quality.equal_time_steps(2000, baseline, wider) == 1584  # (215 - 17) / 0.125
    assert fit_quality.equal_time_steps(2000, baseline, baseline) == 2000


def test_probes_are_reused_only_from_the_same_machine_and_threads(fit_quality):
    here = {"cores": 2, "cpu": "x", "threads": 1, "gpu": None, "torch": "2.13.0", "commit": "a"}
    made = {"steps": 150, "seconds_per_step": 0.1, "fixed_seconds": 15.0}

    def kept(label="wide", machine=here, steps=150):
        return {
            "who": "probe",
            "label": label,
            "codebook_size": 512,
            "batch": 64,
            "probe": {**made, "steps": steps},
            "machine": machine,
        }

    newer = {**made, "seconds_per_step": 0.2}
    stored = [kept(), {**kept(), "probe": newer}, kept(machine={**here, "threads": 2}), kept(label="other")]
    assert fit_quality.stored_probe(stored, "wide", 512, 150, {**here, "commit": "b"}) == newer
    assert fit_quality.stored_probe(stored, "wide", 8192, 150, here) is None
    assert fit_quality.stored_probe(stored, "wide", 512, 300, here) is None
    assert fit_quality.stored_probe([kept(machine={**here, "cpu": "y"})], "wide", 512, 150, here) is None


def test_reference_widths_do_not_follow_vqtok_defaults(fit_quality):
    widths = {
        name: {block.conv3.out_channels for block in fit_quality.Reference(peer, 16, [8, 5, 5, 5]).encoder.res}
        for name, peer in fit_quality.PEERS.items()
    }
    assert widths == {"paper": {128}, "light": {32}, "fsq": {32}}


def test_fsq_usage_counts_its_implicit_codes(fit_quality):
    import torch

    from vqtok.data import Batch
    from vqtok.evaluate import evaluate

    torch.manual_seed(0)
    model = fit_quality.Reference(fit_quality.PEERS["fsq"], 512, [8, 5, 5, 5])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    codes = model.encode(images.float() / 255)  # (4, 8, 8)
    assert codes.shape == (4, 8, 8) and 0 <= int(codes.min()) and int(codes.max()) < 1000
    assert model.decode(codes).shape == (4, 3, 32, 32)
    report = evaluate(model, [Batch(images, [f"k{i}" for i in range(4)], ["x"] * 4, [])], examples=False)
    assert report.codebook_size == 1000
    assert report.codes_used == len(codes.unique()) and report.usage == report.codes_used / 1000


def test_runs_made_with_other_defaults_are_named(fit_quality):
    now = fit_quality.vqtok_defaults()
    before = {"model": {**now["model"], "res_channels": None}, "train": {**now["train"], "lr": 2e-4}}
    assert fit_quality.moved_defaults([{"vqtok_defaults": now}], now) == []
    moved = fit_quality.moved_defaults([{"vqtok_defaults": now}, {"vqtok_defaults": before}], now)
    assert moved == [
        f"model.res_channels None -> {now['model']['res_channels']!r}",
        f"train.lr 0.0002 -> {now['train']['lr']!r}",
    ]
