"""The pretrained feature networks (vqtok.tokenizers.perceptual) on random weights in their files' own layouts:
LPIPS against the lpips package, the Fréchet distance against pytorch-fid's formula (scipy's sqrtm), and the
Inception network's layout and input handling against pytorch-fid's, with the refusals of files that do not
fit. Nothing here is downloaded, so no figure here says what the real weights give."""

import importlib.util
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    VGG16_CONVS,
    inception_file_layout,
    inception_state,
    lpips_linear_state,
    pytorch_fids_distance,
    vgg16_features_state,
)

from vqtok.errors import ModelFormatError
from vqtok.tokenizers.perceptual import (
    LPIPS_WEIGHTS,
    VGG16_WEIGHTS,
    FeatureStats,
    frechet_distance,
    load_inception,
    load_lpips,
)

# A stand-in for torchvision, which does not import beside this torch: `models.vgg16` as lpips calls it, giving
# torchvision's VGG16 `features` (the same 31 layers at the same indices) with the weights of $VQTOK_TEST_VGG16.
FAKE_TORCHVISION = {
    "torchvision/__init__.py": "from . import models\n",
    "torchvision/models/__init__.py": """
        import os
        import torch
        from torch import nn

        D = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]

        def vgg16(pretrained=False, weights=None, **kwargs):
            layers, channels = [], 3
            for width in D:
                if width == "M":
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                    channels = width
            model = nn.Module()
            model.features = nn.Sequential(*layers)
            if pretrained or weights is not None:
                state = torch.load(os.environ["VQTOK_TEST_VGG16"], weights_only=True)
                model.load_state_dict({k: v for k, v in state.items() if k.startswith("features.")})
            return model
    """,
}

REFERENCE_LPIPS = """
import sys
import torch
import lpips

inputs, linear, out = sys.argv[1:]
model = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, model_path=linear, verbose=False)
assert not model.training
with torch.no_grad():
    torch.save([model(x, y).flatten() for x, y in torch.load(inputs)], out)
"""


def fake_torchvision(folder: Path) -> Path:
    for name, text in FAKE_TORCHVISION.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def image_pairs() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs of batches in [-1, 1]: square and not, noise against a blurred and shifted copy, and an image
    against itself."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1
    y = (x.roll(1, dims=3) * 0.7 + 0.3 * (torch.rand(3, 3, 32, 32, generator=gen) * 2 - 1)).clamp(-1, 1)
    wide = torch.rand(2, 3, 24, 40, generator=gen) * 2 - 1
    return [(x, y), (wide, wide.flip(3)), (x[:1], x[:1])]


def test_lpips_equals_the_lpips_package_on_the_same_weights_files(lpips_files, tmp_path):
    """lpips.LPIPS(net='vgg', version='0.1') reads the same two files: the linear layers through model_path,
    VGG16 through torchvision's vgg16 (here a stand-in of torchvision's layout, in the subprocess alone)."""
    vgg16, linear = lpips_files
    pairs = image_pairs()
    torch.save(pairs, tmp_path / "inputs.pt")
    stand_in = fake_torchvision(tmp_path / "fake")
    env = {"PYTHONPATH": str(stand_in), "VQTOK_TEST_VGG16": str(vgg16), "PATH": "/usr/bin:/bin"}
    script = [sys.executable, "-c", REFERENCE_LPIPS, str(tmp_path / "inputs.pt"), str(linear), str(tmp_path / "o.pt")]
    done = subprocess.run(script, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = torch.load(tmp_path / "o.pt")

    model = load_lpips(vgg16, linear)
    with torch.no_grad():
        got = [model(x, y) for x, y in pairs]
    for mine, theirs, (x, _) in zip(got, expected, pairs, strict=True):
        assert mine.shape == (len(x),)
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7)
    assert (got[0] > 0).all() and (got[1] > 0).all() and got[2].item() == 0  # the comparison compared something


def test_lpips_is_differentiable_in_its_inputs_and_its_own_weights_stay_frozen(lpips_files):
    model = load_lpips(*lpips_files)
    assert not any(p.requires_grad for p in model.parameters())
    model.train()  # as a training loop's model.train() reaches a loss module's children
    assert not model.training
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    y = torch.rand(2, 3, 16, 16)
    model(x * 2 - 1, y * 2 - 1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())


def test_lpips_reads_the_vgg_pth_that_the_installed_lpips_package_ships(lpips_files):
    """The lpips package is found, not imported (it imports torchvision), and its real vgg.pth has the layout
    vqtok reads."""
    shipped = Path(importlib.util.find_spec("lpips").origin).parent / "weights" / "v0.1" / "vgg.pth"
    assert LPIPS_WEIGHTS.locate() == shipped and "lpips" not in sys.modules
    model = load_lpips(lpips_files[0])  # the linear layers from where they usually lie
    state = torch.load(shipped, map_location="cpu", weights_only=True)
    for k, lin in enumerate(model.lins):
        assert torch.equal(lin.weight, state[f"lin{k}.model.1.weight"])


def test_vgg16_is_found_in_torch_hubs_cache_and_torchvisions_classifier_is_not_read(tmp_path, monkeypatch):
    """torchvision's file also holds `classifier.*` (123M parameters), which LPIPS does not use: such keys are
    skipped whatever their size, so they are small here."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert VGG16_WEIGHTS.locate() is None
    checkpoints = tmp_path / "torch" / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    features = vgg16_features_state(seed=3)
    classifier = {f"classifier.{i}.{entry}": torch.zeros(2) for i in (0, 3, 6) for entry in ("weight", "bias")}
    torch.save({**features, **classifier}, checkpoints / "vgg16-397923af.pth")
    torch.save(lpips_linear_state(), tmp_path / "vgg.pth")
    assert VGG16_WEIGHTS.locate() == checkpoints / "vgg16-397923af.pth"
    model = load_lpips(linear=tmp_path / "vgg.pth")
    for index in VGG16_CONVS:
        assert torch.equal(model.vgg.features[index].weight, features[f"features.{index}.weight"])


def one_line_refusal(call, *expected: str) -> None:
    with pytest.raises(ModelFormatError) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message and all(text in message for text in expected), message


def test_missing_and_misshapen_weights_files_are_refused_in_one_line(lpips_files, tmp_path, monkeypatch):
    vgg16, linear = lpips_files
    hub = Path(torch.hub.get_dir()) / "checkpoints"
    one_line_refusal(lambda: load_lpips(linear=linear), "torchvision's VGG16", f"vgg16-397923af.pth in {hub}")
    one_line_refusal(lambda: load_lpips(linear=linear), "--vgg16-weights")
    one_line_refusal(lambda: load_inception(), f"pt_inception-2015-12-05-6726825d.pth in {hub}", "--inception-weights")
    one_line_refusal(lambda: load_lpips(tmp_path / "nope.pth", linear), f"--vgg16-weights {tmp_path}/nope.pth: no such")
    with monkeypatch.context() as patch:  # without the lpips package, vgg.pth has no usual place
        patch.setattr(importlib.util, "find_spec", lambda name: None)
        one_line_refusal(lambda: load_lpips(vgg16), "pip install --no-deps lpips", "vgg.pth with --lpips-weights")

    features, lins = vgg16_features_state(), lpips_linear_state()
    bad = {
        "missing": ({k: v for k, v in features.items() if k != "features.12.bias"}, "it lacks features.12.bias"),
        "extra": ({**features, "features.30.weight": torch.zeros(1)}, "unexpected key features.30.weight"),
        "shape": (
            {**features, "features.5.weight": torch.zeros(128, 64, 1, 1)},
            "features.5.weight is (128, 64, 1, 1)",
        ),
    }
    for name, (state, message) in bad.items():
        torch.save(state, tmp_path / f"{name}.pth")
        one_line_refusal(lambda p=tmp_path / f"{name}.pth": load_lpips(p, linear), "not torchvision's VGG16", message)
    torch.save({**lins, "lin4.model.1.weight": torch.zeros(1, 256, 1, 1)}, tmp_path / "lin.pth")
    one_line_refusal(lambda: load_lpips(vgg16, tmp_path / "lin.pth"), "lin4.model.1.weight is (1, 256, 1, 1)")

    (tmp_path / "garbage.pth").write_bytes(b"not a weights file")
    one_line_refusal(lambda: load_inception(tmp_path / "garbage.pth"), "garbage.pth: cannot be read as")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pth")
    one_line_refusal(lambda: load_inception(tmp_path / "list.pth"), "list.pth: not Inception", "no state dict")
    torch.save(torch.nn.Linear(2, 2), tmp_path / "pickled.pth")  # a whole module: only weights_only=False runs it
    one_line_refusal(lambda: load_inception(tmp_path / "pickled.pth"), "pickled.pth: cannot be read as")


def test_inception_refuses_a_file_of_another_layout_and_accepts_one_without_its_unused_keys(tmp_path):
    state = inception_state()
    cases = {
        "missing": ({k: v for k, v in state.items() if k != "Mixed_6c.branch7x7_2.conv.weight"}, "it lacks Mixed_6c"),
        "aux": ({**state, "AuxLogits.fc.weight": torch.zeros(1000, 768)}, "unexpected key AuxLogits.fc.weight"),
        "classes": ({**state, "fc.weight": torch.zeros(1000, 2048)}, "fc.weight is (1000, 2048), not (1008, 2048)"),
    }
    for name, (changed, message) in cases.items():
        torch.save(changed, tmp_path / f"{name}.pth")
        one_line_refusal(lambda p=tmp_path / f"{name}.pth": load_inception(p), "pytorch-fid's Inception", message)
    older = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}
    torch.save(older, tmp_path / "older.pth")
    model = load_inception(tmp_path / "older.pth")
    assert torch.equal(model.Mixed_7c.branch_pool.bn.running_var, state["Mixed_7c.branch_pool.bn.running_var"])


def test_inception_maps_every_key_of_pytorch_fids_file_and_gives_pool_features(inception_file):
    """Every key of pt_inception-2015-12-05-6726825d.pth's layout (transcribed in conftest from torchvision's
    Inception3, which pytorch-fid loads it into) lands in the network with its shape, the classifier `fc`
    excepted, which pool features do not use. Its numerics are not compared with pytorch-fid's: pytorch-fid
    builds its network from torchvision's classes, and torchvision does not import beside this torch."""
    layout = inception_file_layout()
    # the transcription against torchvision's published count (inception_v3's weights meta: num_params 27,161,264,
    # with the AuxLogits head of 3,326,696 parameters and a 1000-class fc where this file has 1008 classes)
    parameters = sum(torch.Size(s).numel() for k, s in layout.items() if k.endswith(("weight", "bias")))
    assert parameters + 3_326_696 - 8 * 2049 == 27_161_264

    model = load_inception(inception_file)
    file = torch.load(inception_file, weights_only=True)
    own = model.state_dict()
    assert set(own) == set(layout) - {"fc.weight", "fc.bias"}
    assert all(torch.equal(own[key], file[key]) for key in own)
    assert not model.training and not any(p.requires_grad for p in model.parameters())

    images = torch.rand(3, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model(images)
    assert features.shape == (3, 2048) and features.dtype == torch.float32
    assert torch.isfinite(features).all() and (features >= 0).all()  # means of ReLU outputs
    assert (features[0] - features[1]).abs().max() > 0


def bilinear_by_hand(image: np.ndarray, size: int) -> np.ndarray:
    """(C, H, W) -> (C, size, size) as F.interpolate(mode='bilinear', align_corners=False) resizes: output pixel i
    samples the input at (i + 0.5) * H / size - 0.5, clamped at 0, between its two neighbours."""

    def weights(n: int) -> np.ndarray:  # (size, n): each output row's weights over the input rows
        matrix = np.zeros((size, n))
        for i in range(size):
            source = max((i + 0.5) * n / size - 0.5, 0.0)
            low = min(int(np.floor(source)), n - 1)
            high, share = min(low + 1, n - 1), source - low
            matrix[i, low] += 1 - share
            matrix[i, high] += share
        return matrix

    rows, columns = weights(image.shape[1]), weights(image.shape[2])
    return np.einsum("ih,chw,jw->cij", rows, image, columns)


def test_inception_resizes_to_299_bilinearly_and_scales_0_1_to_minus_1_1_as_pytorch_fid(inception_file):
    """pytorch-fid's InceptionV3(resize_input=True, normalize_input=True) resizes images in [0, 1] to 299x299
    (bilinear, align_corners=False), then maps them to 2x - 1. The first convolution must see that, and give,
    on a constant image c, ReLU(BN((2c - 1) * sum of its weights)) over 149x149 positions."""
    model = load_inception(inception_file)
    seen = []  # (input, output) of the first convolution
    model.Conv2d_1a_3x3.conv.register_forward_hook(lambda module, inputs, output: seen.append((inputs[0], output)))
    image = np.array([[[0.0, 0.5, 1.0], [0.25, 0.75, 0.1]]] * 3) * np.array([1.0, 0.8, 0.6])[:, None, None]
    c = 0.7
    with torch.no_grad():
        model(torch.tensor(image, dtype=torch.float32)[None])
        model(torch.full((1, 3, 20, 20), c))
        (resized, _), (_, convolved) = seen
        first = model.Conv2d_1a_3x3.bn(convolved).clamp(min=0)  # (1, 32, 149, 149)
    np.testing.assert_allclose(resized[0].double().numpy(), 2 * bilinear_by_hand(image, 299) - 1, atol=1e-6)

    block = model.Conv2d_1a_3x3
    bn = block.bn
    by_hand = (2 * c - 1) * block.conv.weight.sum(dim=(1, 2, 3))  # (32,): every position of a constant image
    by_hand = ((by_hand - bn.running_mean) / (bn.running_var + 1e-3).sqrt() * bn.weight + bn.bias).clamp(min=0)
    assert first.shape == (1, 32, 149, 149) and (by_hand > 0).any()
    torch.testing.assert_close(first[0].amin(dim=(1, 2)), by_hand, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first[0].amax(dim=(1, 2)), by_hand, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n", [400, 40])  # more images than dimensions, and fewer: rank-deficient covariances
def test_frechet_distance_equals_pytorch_fids_on_the_same_features(n):
    gen = np.random.default_rng(n)
    dim = 64
    mixing = gen.normal(size=(dim, dim)) / 8
    real = np.maximum(gen.normal(size=(n, dim)) @ mixing + 0.5, 0)  # non-negative and correlated, as pool features
    fake = np.maximum(real + gen.normal(scale=0.1, size=(n, dim)) + 0.02, 0)
    stats = []
    for features in (real, fake):
        s = FeatureStats(dim)
        for part in np.array_split(features, 3):  # added up batch by batch, as eval does
            s.add(torch.tensor(part, dtype=torch.float32))
        mu, cov = s.mean_cov()
        x = features.astype(np.float32).astype(np.float64)
        np.testing.assert_allclose(mu.numpy(), x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(cov.numpy(), np.cov(x, rowvar=False), rtol=1e-9, atol=1e-12)
        stats.append((mu, cov, x.mean(axis=0), np.cov(x, rowvar=False)))
    (mu1, s1, m1, c1), (mu2, s2, m2, c2) = stats
    assert (np.linalg.matrix_rank(c1) < dim) == (n < dim)
    expected = pytorch_fids_distance(m1, c1, m2, c2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    # a set against itself: 0 but for the rounding of eigenvalues that are 0 where the covariance is singular
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-7 * np.trace(c1)
