"""The pretrained feature networks that the training objective and `vqtok eval` measure images with: LPIPS on
VGG16, and Inception-v3's pool features for rFID.

- LPIPS ("The Unreasonable Effectiveness of Deep Features as a Perceptual Metric", Zhang et al. 2018, section
  3): both images through VGG16, each of five ReLU outputs unit-normalised along channels, their squared
  difference weighted per channel by a learned 1x1 layer, averaged over positions and summed over the five.
  This is the `lpips` package's `LPIPS(net='vgg', version='0.1')` in eval mode (its dropout off).
- rFID: the Fréchet distance ("GANs Trained by a Two Time-Scale Update Rule...", Heusel et al. 2017, section
  4) between Gaussians fitted to the 2,048 pool features of the originals and of their reconstructions, the
  network being pytorch-fid's port of TensorFlow's Inception (`InceptionV3(use_fid_inception=True)`).

Module and key names are those of the weights files people already have, so loading is a shape check:
torchvision's `vgg16-397923af.pth` (`features.N.*`), the `vgg.pth` of linear layers that the lpips package ships
(`lin{k}.model.1.weight`), and pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (torchvision's Inception3
names). vqtok never downloads them: each is read from a path the user names, else where it usually lies (torch
hub's cache for the two that torchvision and pytorch-fid download there, the installed lpips package for
vgg.pth), with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import importlib.util
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from vqtok.distributed import in_process_group
from vqtok.errors import ModelFormatError

# -- the weights files ---------------------------------------------------------------------------------------


def hub_checkpoints() -> Path:
    """torch hub's cache, where torchvision and pytorch-fid download their weights ($TORCH_HOME/hub/checkpoints)."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def lpips_package_weights() -> Path | None:
    """The installed lpips package's weights/v0.1 folder; None without the package. The package is found, not
    imported: it imports torchvision."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1"


@dataclass(frozen=True)
class WeightsFile:
    """A pretrained weights file: what it holds, its usual name, the folder it usually lies in (None when the
    package that holds it is not installed, which `install` installs), and the option that names another path."""

    what: str
    name: str
    folder: Callable[[], Path | None]
    option: str
    install: str = ""

    def locate(self, path: str | Path | None = None) -> Path | None:
        """The file at `path` (ModelFormatError if there is none there), else in its usual folder, else None."""
        if path is not None:
            if not Path(path).is_file():
                raise ModelFormatError(f"{self.option} {path}: no such file")
            return Path(path)
        folder = self.folder()
        if folder is not None and (folder / self.name).is_file():
            return folder / self.name
        return None

    def missing(self) -> str:
        """Why the file was not found and what to do, in one line."""
        folder = self.folder()
        if folder is None:
            return f"no {self.what}: {self.install}, or name a {self.name} with {self.option}"
        return f"no {self.what}: put {self.name} in {folder} or name the file with {self.option}"

    def require(self, path: str | Path | None = None) -> Path:
        found = self.locate(path)
        if found is None:
            raise ModelFormatError(self.missing())
        return found


VGG16_WEIGHTS = WeightsFile("torchvision's VGG16 weights", "vgg16-397923af.pth", hub_checkpoints, "--vgg16-weights")
LPIPS_WEIGHTS = WeightsFile(
    "lpips' linear layers", "vgg.pth", lpips_package_weights, "--lpips-weights", install="pip install --no-deps lpips"
)
INCEPTION_WEIGHTS = WeightsFile(
    "pytorch-fid's Inception weights", "pt_inception-2015-12-05-6726825d.pth", hub_checkpoints, "--inception-weights"
)


def read_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a state-dict file, read without running pickled code (weights_only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelFormatError(f"{path}: cannot be read as {what} ({reason})") from None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(f"{path}: not {what}: it holds no state dict of tensors")
    return state


def match_layout(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    path: Path,
    what: str,
    optional: Callable[[str], bool] = lambda key: False,
    ignored: Callable[[str], bool] = lambda key: False,
) -> dict[str, torch.Tensor]:
    """The entries of `state` that `expected` names, once every expected key is there (unless optional) with its
    shape and nothing else is (unless ignored); ModelFormatError naming the first key that is not so."""
    for key, shape in expected.items():
        if key not in state:
            if optional(key):
                continue
            raise ModelFormatError(f"{path}: not {what}: it lacks {key}")
        if tuple(state[key].shape) != tuple(shape):
            found = tuple(state[key].shape)
            raise ModelFormatError(f"{path}: not {what}: {key} is {found}, not {tuple(shape)}")
    for key in state:
        if key not in expected and not ignored(key):
            raise ModelFormatError(f"{path}: not {what}: unexpected key {key}")
    return {key: value for key, value in state.items() if key in expected}


class Frozen(nn.Module):
    """A pretrained measuring network: weights never trained, and eval mode whatever a parent module asks, so
    that a training loop's `.train()` never switches batch norm to batch statistics."""

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True):
        return super().train(False)


# -- LPIPS -----------------------------------------------------------------------------------------------------

# torchvision's VGG16 ("configuration D"): 3x3 convolutions (padding 1) each followed by a ReLU, "M" a 2x2 max
# pool; the last pool is left out, as LPIPS stops at relu5_3.
VGG16_LAYERS = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512]
VGG16_TAPS = (3, 8, 15, 22, 29)  # indices in `features` of relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
LPIPS_SHIFT = (-0.030, -0.088, -0.188)  # lpips' ScalingLayer: [-1, 1] inputs to about ImageNet's normalisation
LPIPS_SCALE = (0.458, 0.448, 0.450)
LPIPS_EPS = 1e-10  # lpips' normalize_tensor: f / (||f|| + eps)


class VGG16Features(nn.Module):
    """torchvision's `vgg16().features` up to relu5_3, with its indices (so its keys are the file's), returning
    the five ReLU outputs LPIPS compares."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in VGG16_LAYERS:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU()]
                channels = width
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        taps = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in VGG16_TAPS:
                taps.append(x)  # (B, C_k, H / 2^k, W / 2^k)
        return taps


def unit_channels(f: torch.Tensor) -> torch.Tensor:
    """Each position's feature vector (B, C, h, w) divided by its length along C."""
    return f / (f.pow(2).sum(dim=1, keepdim=True).sqrt() + LPIPS_EPS)


class LPIPS(Frozen):
    """lpips(x, y): the LPIPS distance (B,) of images x and y (B, 3, H, W) in [-1, 1], differentiable with
    respect to both; its own weights are frozen. Build it with `load_lpips`."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1), persistent=False)
        self.vgg = VGG16Features()
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, kernel_size=1, bias=False) for c in LPIPS_CHANNELS)
        self.freeze()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        taps = self.vgg((torch.cat([x, y]) - self.shift) / self.scale)  # 5 x (2B, C_k, h_k, w_k): one pass for both
        distance = x.new_zeros(B, 1)
        for f, lin in zip(taps, self.lins, strict=True):
            fx, fy = unit_channels(f).split(B)  # (B, C_k, h_k, w_k) each
            distance = distance + lin((fx - fy) ** 2).mean(dim=(2, 3))  # (B, 1)
        return distance.flatten()  # (B,)


def lpips_layout() -> tuple[dict[str, tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """The shapes the two files hold: torchvision's VGG16 features (`features.N.weight/bias`) and lpips'
    linear layers (`lin{k}.model.1.weight`, index 0 of lpips' Sequential being its dropout)."""
    features = {f"features.{key}": tuple(v.shape) for key, v in VGG16Features().features.state_dict().items()}
    linear = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(LPIPS_CHANNELS)}
    return features, linear


def load_lpips(
    vgg16: str | Path | None = None, linear: str | Path | None = None, device: str | torch.device = "cpu"
) -> LPIPS:
    """LPIPS with VGG16 from `vgg16` (torchvision's vgg16-397923af.pth, or a file of its `features.*` alone; its
    `classifier.*` is not used) and the linear layers from `linear` (the lpips package's weights/v0.1/vgg.pth),
    each found where it usually lies when not named. ModelFormatError, in one line, for a file that is missing
    or of another layout."""
    vgg_path, linear_path = VGG16_WEIGHTS.require(vgg16), LPIPS_WEIGHTS.require(linear)
    features, lins = lpips_layout()
    vgg_state = match_layout(
        read_weights(vgg_path, "VGG16 weights"),
        features,
        vgg_path,
        "torchvision's VGG16 weights",
        ignored=lambda key: key.startswith("classifier."),
    )
    linear_state = match_layout(
        read_weights(linear_path, "LPIPS linear layers"), lins, linear_path, "lpips' vgg.pth linear layers"
    )
    model = LPIPS()
    model.vgg.load_state_dict(vgg_state)
    model.lins.load_state_dict({f"{k}.weight": linear_state[f"lin{k}.model.1.weight"] for k in range(len(lins))})
    return model.to(device)


# -- Inception-v3 for rFID -----------------------------------------------------------------------------------

INCEPTION_SIZE = 299  # pytorch-fid resizes every image to this, bilinearly
INCEPTION_FEATURES = 2048
INCEPTION_CLASSES = 1008  # the TensorFlow graph's classifier, which the file holds and features do not use


class BasicConv(nn.Module):
    """Convolution without bias, batch norm (eps 0.001), ReLU: torchvision's BasicConv2d."""

    def __init__(self, in_channels: int, out_channels: int, **conv) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """TensorFlow's 3x3 average pool, stride 1: the padded zeros are not counted (pytorch-fid's patch)."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """Mixed_5b-d (35x35): 1x1, 5x5, double 3x3 and pooled branches -> 224 + pool_features channels."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv(in_channels, pool_features, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], dim=1)


class InceptionB(nn.Module):
    """Mixed_6a: 35x35 -> 17x17, a strided 3x3, a strided double 3x3 and a max pool -> 768 channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionC(nn.Module):
    """Mixed_6b-e (17x17): 7x7 convolutions factored into 1x7 and 7x1 -> 768 channels."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            dbl = conv(dbl)
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(tf_avg_pool(x))], dim=1)


class InceptionD(nn.Module):
    """Mixed_7a: 17x17 -> 8x8, strided 3x3 branches and a max pool -> 1280 channels."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class InceptionE(nn.Module):
    """Mixed_7b-c (8x8): 3x3 convolutions split into parallel 1x3 and 3x1 -> 2048 channels. Mixed_7c's pooled
    branch takes a max pool where the paper has an average: the TensorFlow graph FID was defined on does so."""

    def __init__(self, in_channels: int, max_pool: bool = False) -> None:
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv(in_channels, 192, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        dbl = torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], dim=1)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else tf_avg_pool(x)
        return torch.cat([self.branch1x1(x), b3, dbl, self.branch_pool(pooled)], dim=1)


class InceptionV3(Frozen):
    """inception(images): the 2,048 pool features (B, 2048) of images (B, 3, H, W) in [0, 1], as pytorch-fid's
    `InceptionV3([3])` gives them (resize_input, normalize_input, use_fid_inception). Build it with
    `load_inception`."""

    def __init__(self) -> None:
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.freeze()

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(INCEPTION_SIZE, INCEPTION_SIZE), mode="bilinear", align_corners=False)
        x = 2 * x - 1  # (B, 3, 299, 299) in [-1, 1], the range the TensorFlow graph takes
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (B, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # (B, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))  # (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)


def inception_layout() -> dict[str, tuple[int, ...]]:
    """The shapes pytorch-fid's file holds: the network's own state dict, and the 1008-class classifier."""
    layout = {key: tuple(v.shape) for key, v in InceptionV3().state_dict().items()}
    layout["fc.weight"], layout["fc.bias"] = (INCEPTION_CLASSES, INCEPTION_FEATURES), (INCEPTION_CLASSES,)
    return layout


def load_inception(path: str | Path | None = None, device: str | torch.device = "cpu") -> InceptionV3:
    """pytorch-fid's Inception from `path` (pt_inception-2015-12-05-6726825d.pth), found in torch hub's cache
    when not named. Batch norm's num_batches_tracked (which files saved by older torch lack) and the unused
    classifier `fc.*` may be absent; anything else missing, extra or misshapen is a one-line ModelFormatError."""
    found = INCEPTION_WEIGHTS.require(path)
    state = match_layout(
        read_weights(found, "Inception-v3 weights"),
        inception_layout(),
        found,
        "pytorch-fid's Inception-v3 weights",
        optional=lambda key: key.endswith(".num_batches_tracked") or key.startswith("fc."),
    )
    model = InceptionV3()
    model.load_state_dict({**model.state_dict(), **{k: v for k, v in state.items() if not k.startswith("fc.")}})
    return model.to(device)


# -- the Fréchet distance ------------------------------------------------------------------------------------


class FeatureStats:
    """Running sums of feature vectors: their count, sum and sum of outer products, in float64. These are what
    the mean and covariance need, and what processes add up (`all_reduce`)."""

    def __init__(self, dim: int = INCEPTION_FEATURES, device: str | torch.device = "cpu") -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.total = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def add(self, features: torch.Tensor) -> None:
        f = features.detach().double()  # (B, D)
        self.count += len(f)
        self.total += f.sum(dim=0)
        self.outer += f.T @ f  # (D, D)

    def all_reduce(self) -> None:
        """Every process's sums added up; nothing outside a process group."""
        if in_process_group():
            for t in (self.count, self.total, self.outer):
                dist.all_reduce(t)

    @property
    def n(self) -> int:
        return int(self.count.item())

    def mean_cov(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The mean (D,) and unbiased covariance (D, D), as numpy's mean and cov(rowvar=False) give them, on the
        CPU. Sums of float64 keep the cancellation in outer - n mu mu^T far below features' spread."""
        n = self.count.item()
        mu = (self.total / n).cpu()
        cov = (self.outer.cpu() - n * torch.outer(mu, mu)) / (n - 1)
        return mu, cov


def frechet_distance(mu1: torch.Tensor, sigma1: torch.Tensor, mu2: torch.Tensor, sigma2: torch.Tensor) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) of two Gaussians, in float64.

    S1 S2 has the eigenvalues of the symmetric positive semi-definite S1^(1/2) S2 S1^(1/2), so the trace of its
    square root is the sum of their square roots: two symmetric eigendecompositions, stable where S1 or S2 is
    singular (fewer images than dimensions), where a general matrix square root is not.
    """
    mu1, sigma1, mu2, sigma2 = (t.double() for t in (mu1, sigma1, mu2, sigma2))
    values, vectors = torch.linalg.eigh(sigma1)
    root = (vectors * values.clamp(min=0).sqrt()) @ vectors.T  # S1^(1/2)
    product = root @ sigma2 @ root
    eigenvalues = torch.linalg.eigvalsh((product + product.T) / 2).clamp(min=0)  # rounding breaks the symmetry
    diff = mu1 - mu2
    return float(diff @ diff + sigma1.trace() + sigma2.trace() - 2 * eigenvalues.sqrt().sum())
