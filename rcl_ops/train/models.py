"""Networks: the restoration backbones f (U-Net, DnCNN) and the frozen feature encoder g_e (ResNet-50 stages).

Every restoration network maps an observation to an RGB image, ``forward(x) -> (N, 3, H, W)``,
where x is (N, 3, H, W) RGB or (N, 1, H, W) RGGB RAW; its last layer is ``self.head``
(what the proxy evaluation replaces), ``features(x)`` is everything before it and
``from_features(x, features)`` finishes the forward pass.
"""

from __future__ import annotations

import copy
import hashlib
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .noise import pack_raw, raw_to_planes, restoration_base

MODELS = ("unet", "dncnn")
RAW_INPUTS = ("planes", "packed")
UNET_OUTPUTS = ("residual", "image")
# A residual network's head starts at this fraction of PyTorch's default initialisation, so that f(x) starts
# within a hair of the identity (a 1e-3-sized residual) while every gradient, the contrastive term's included,
# is nonzero from the first step; an exactly zero head would sit at a fixed point of RCL (a zero residual has
# zero EMD/BD/MMD gradients and the consistency term is at its minimum there). Per architecture: the DnCNN's
# head reads BatchNorm-normalised features, and at 1e-2 its first residuals carried so much image content that
# the contrast check refused the quick Table 5 (EMD L_contrast per query at step 0: 0.83-0.92 over seeds 0-2,
# below the true noise's 1.31); at 1e-3: 1.76-1.87 (the U-Net at 1e-2: 1.92-2.05; chance 2.08).
RESIDUAL_HEAD_GAIN = {"unet": 1e-2, "dncnn": 1e-3}


class RawLayout:
    """How a network sees an RGGB mosaic (N, 1, H, W) and returns full-resolution RGB.

    planes: three sparse colour planes at full resolution (zeros where a colour is not sampled), 3
    channels in, 3 out. packed (the paper's footnote 3): the 2x2 pattern packed into 4 channels at half
    resolution; the network works at H / 2 x W / 2 and its head gives 12 channels, which a pixel shuffle
    turns into the (N, 3, H, W) image (one RGB value per pixel of each 2x2 block). RGB input: as is."""

    def __init__(self, raw: bool, raw_input: str = "planes"):
        if raw_input not in RAW_INPUTS:
            raise ValueError(f"unknown raw_input {raw_input!r}; choose one of {RAW_INPUTS}")
        self.packed = raw and raw_input == "packed"
        self.raw = raw
        self.in_channels = 4 if self.packed else 3
        self.out_channels = 12 if self.packed else 3

    def network_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return pack_raw(x)
        return raw_to_planes(x) if self.raw else x

    def image(self, head_output: torch.Tensor) -> torch.Tensor:
        return F.pixel_shuffle(head_output, 2) if self.packed else head_output


def scale_head_(head: nn.Module, gain: float) -> None:
    """Multiply every parameter of ``head`` by ``gain`` in place (``RESIDUAL_HEAD_GAIN``; 0: exactly the
    identity for a residual network)."""
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.mul_(gain)


DEFAULT_WIDTH = {"unet": 32, "dncnn": 64}
DEFAULT_DEPTH = {"unet": 4, "dncnn": 17}


class DoubleConv(nn.Sequential):
    """(conv 3x3 -> ReLU) x 2, padding 1: (N, Cin, H, W) -> (N, Cout, H, W)."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net (Ronneberger et al. 2015). ``output="residual"`` (default) predicts the residual through a
    global skip, f(x) = base(x) - head(features(x)) with base(x) = x (RGB) or its bilinear demosaic (RAW),
    and starts within a hair of the identity (``RESIDUAL_HEAD_GAIN``); ``output="image"`` predicts the image,
    f(x) = head(features(x)), with no path from input to output.

    ``depth`` 2x2 max-pool downsamplings, channels width * 2^level, transposed-conv
    upsampling with skip concatenation, and a 1x1 conv ``head`` to 3 channels. Any H, W:
    the input is replicate-padded to a multiple of 2^depth and the output cropped back.
    ``raw=True`` takes an RGGB mosaic (N, 1, H, W), fed to the network as ``raw_input`` (``RawLayout``:
    sparse colour planes, or packed 4-channel at half resolution with a pixel-shuffled head).
    """

    def __init__(
        self, width: int = 32, depth: int = 4, raw: bool = False, raw_input: str = "planes", output: str = "residual"
    ):
        super().__init__()
        if width < 1 or depth < 0:
            raise ValueError(f"UNet: width must be >= 1 and depth >= 0, got width={width}, depth={depth}")
        if output not in UNET_OUTPUTS:
            raise ValueError(f"UNet: output must be one of {UNET_OUTPUTS}, got {output!r}")
        self.raw, self.depth = raw, depth
        self.predicts_residual = output == "residual"
        self.layout = RawLayout(raw, raw_input)
        channels = [width * 2**level for level in range(depth + 1)]
        self.encoders = nn.ModuleList([DoubleConv(self.layout.in_channels, channels[0])])
        self.encoders.extend(DoubleConv(channels[i], channels[i + 1]) for i in range(depth))
        self.upsamplers = nn.ModuleList(
            nn.ConvTranspose2d(channels[i + 1], channels[i], 2, stride=2) for i in reversed(range(depth))
        )
        self.decoders = nn.ModuleList(DoubleConv(2 * channels[i], channels[i]) for i in reversed(range(depth)))
        self.head = nn.Conv2d(channels[0], self.layout.out_channels, 1)
        if self.predicts_residual:
            scale_head_(self.head, RESIDUAL_HEAD_GAIN["unet"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, Cin, H, W) -> (N, width, H, W) (H / 2, W / 2 for packed RAW), the input of the head."""
        x = self.layout.network_input(x)
        height, width = x.shape[-2:]
        multiple = 2**self.depth
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h), mode="replicate")
        skips = []
        for level, encoder in enumerate(self.encoders):
            x = encoder(x if level == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        skips.pop()
        for upsample, decoder in zip(self.upsamplers, self.decoders):
            x = decoder(torch.cat([skips.pop(), upsample(x)], dim=1))
        return x[..., :height, :width]

    def from_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The output given ``features = self.features(x)``: base(x) - head(features), or head(features) for
        ``output="image"`` (the head pixel-shuffled for packed RAW)."""
        predicted = self.layout.image(self.head(features))
        return restoration_base(x, self.raw) - predicted if self.predicts_residual else predicted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3 or 1, H, W) -> the restored image (N, 3, H, W)."""
        return self.from_features(x, self.features(x))


class DnCNN(nn.Module):
    """DnCNN (Zhang et al. 2017), which predicts the residual: f(x) = base(x) - head(features(x)) (Sec. 4.4).

    ``depth`` 3x3 conv layers: conv + ReLU, (depth - 2) x (conv + BatchNorm + ReLU), and the
    ``head`` conv to 3 channels. base(x) = x for RGB, the bilinear demosaic of x for RAW, so
    the residual x - f(x) (or x - mosaic(f(x))) is the predicted noise in both cases. RAW input as
    ``raw_input`` (``RawLayout``). The head starts at ``RESIDUAL_HEAD_GAIN['dncnn']`` times PyTorch's default
    initialisation, so f starts within a hair of the identity.
    """

    predicts_residual = True

    def __init__(self, width: int = 64, depth: int = 17, raw: bool = False, raw_input: str = "planes"):
        super().__init__()
        if width < 1 or depth < 2:
            raise ValueError(f"DnCNN: width must be >= 1 and depth >= 2, got width={width}, depth={depth}")
        self.raw = raw
        self.layout = RawLayout(raw, raw_input)
        layers: list[nn.Module] = [nn.Conv2d(self.layout.in_channels, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.body = nn.Sequential(*layers)
        self.head = nn.Conv2d(width, self.layout.out_channels, 3, padding=1)
        scale_head_(self.head, RESIDUAL_HEAD_GAIN["dncnn"])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, Cin, H, W) -> (N, width, H, W) (H / 2, W / 2 for packed RAW)."""
        return self.body(self.layout.network_input(x))

    def from_features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The output given ``features = self.features(x)``: base(x) - head(features)."""
        return restoration_base(x, self.raw) - self.layout.image(self.head(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3 or 1, H, W) -> the restored image (N, 3, H, W)."""
        return self.from_features(x, self.features(x))


def build_model(
    name: str,
    width: int | None = None,
    depth: int | None = None,
    raw: bool = False,
    raw_input: str = "planes",
    unet_output: str = "residual",
) -> nn.Module:
    """A restoration network by name ("unet" or "dncnn"); None width/depth take the model's default;
    ``raw_input``: how RAW mosaics enter it (``RawLayout``); ``unet_output``: what a U-Net predicts
    ("residual" or "image"; a DnCNN always predicts the residual)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")
    width = DEFAULT_WIDTH[name] if width is None else width
    depth = DEFAULT_DEPTH[name] if depth is None else depth
    if name == "unet":
        return UNet(width=width, depth=depth, raw=raw, raw_input=raw_input, output=unet_output)
    return DnCNN(width=width, depth=depth, raw=raw, raw_input=raw_input)


def layer_output_count(model: nn.Module, inputs: torch.Tensor) -> int:
    """How many values the layers of ``model(inputs)`` write: a rough count of the activations autograd
    keeps for the backward pass (in-place layers reuse their input and are not counted). Meant for meta
    tensors, where nothing is computed."""
    total = 0

    def count(module: nn.Module, args, output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel()

    leaves = [m for m in model.modules() if not any(m.children()) and not getattr(m, "inplace", False)]
    handles = [m.register_forward_hook(count) for m in leaves]
    try:
        model(inputs)
    finally:
        for handle in handles:
            handle.remove()
    return total


_NORMALISATIONS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def _uniform_fan_in_(layer: nn.Module, generator: torch.Generator) -> None:
    """PyTorch's default initialisation of a Linear/conv/transposed-conv layer, drawn from ``generator``:
    weight and bias uniform in +-1/sqrt(fan_in) (kaiming_uniform_(a=sqrt(5)) has that bound), where
    fan_in = weight.shape[1] * prod(kernel) as torch's _calculate_fan_in_and_fan_out computes it (for a
    transposed conv weight.shape[1] is out_channels / groups, for a conv in_channels / groups)."""
    fan_in = layer.weight.shape[1] * math.prod(layer.weight.shape[2:])
    bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
    for parameter in (layer.weight, layer.bias):
        if parameter is not None:
            draw = torch.rand(parameter.shape, generator=generator, device=generator.device)
            parameter.copy_(draw * 2 * bound - bound)


def replace_head(model: nn.Module, generator: torch.Generator) -> None:
    """Replace ``model.head`` (a layer or a module of layers, e.g. a decoder) by a freshly initialised copy
    of the same structure: PyTorch's default initialisation of every layer, random values drawn from
    ``generator`` only (the global RNG is neither used nor advanced), normalisation layers reset (unit
    scale, zero shift, fresh running statistics).

    Supported layers with parameters: Linear, Conv1d/2d/3d, ConvTranspose1d/2d/3d (uniform +-1/sqrt(fan_in),
    weight then bias, layers in ``modules()`` order), BatchNorm/InstanceNorm/GroupNorm/LayerNorm; any
    other layer with parameters of its own raises TypeError. A Conv2d head gets exactly the values of
    the original single-conv implementation.
    """
    new = copy.deepcopy(model.head)
    layers = list(new.modules())
    for layer in layers:
        if next(layer.parameters(recurse=False), None) is None and not isinstance(layer, _NORMALISATIONS):
            continue
        if not isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd, *_NORMALISATIONS)) or isinstance(
            layer, nn.modules.lazy.LazyModuleMixin
        ):
            raise TypeError(
                f"replace_head: cannot re-initialise a {type(layer).__name__} layer in the head; supported "
                "layers with parameters are Linear, Conv*d, ConvTranspose*d and BatchNorm/InstanceNorm/GroupNorm/"
                "LayerNorm"
            )
    with torch.no_grad():
        for layer in layers:
            if isinstance(layer, _NORMALISATIONS):
                layer.reset_parameters()
            elif isinstance(layer, (nn.Linear, nn.modules.conv._ConvNd)):
                _uniform_fan_in_(layer, generator)
    for parameter in new.parameters():
        parameter.grad = None
        parameter.requires_grad_(True)
    model.head = new


def freeze_all_but_head(model: nn.Module) -> list[nn.Parameter]:
    """Set requires_grad False on every parameter outside ``model.head``; return the head's parameters."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head = list(model.head.parameters())
    for parameter in head:
        parameter.requires_grad_(True)
    return head


# ---------------------------------------------------------------------------------------------
# The frozen encoder g_e of the consistency loss (Eq. 9): ResNet-50 stem and first stages, with
# torchvision's parameter names so a torchvision ResNet-50 state dict loads unchanged.

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RESNET50_BLOCKS = (3, 4, 6, 3)


class Bottleneck(nn.Module):
    """ResNet-50 bottleneck (torchvision v1.5: stride on the 3x3 conv), expansion 4."""

    def __init__(self, in_channels: int, planes: int, stride: int = 1):
        super().__init__()
        out_channels = planes * 4
        self.conv1 = nn.Conv2d(in_channels, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ResNet50Encoder(nn.Module):
    """The stem and the first ``stages`` (1-4) residual stages of ResNet-50, frozen, in eval mode.

    forward: (N, 3, H, W) RGB in [0, 1] -> features (N, 256 * 2^(stages - 1), H / 2^(stages + 1), W / ...),
    after ImageNet mean/std normalisation. Parameter names match torchvision's ``resnet50``
    (conv1, bn1, layer1 ... layer4), so its state dict loads with ``load_encoder_weights``.
    Without weights the encoder keeps torchvision's initialisation (Kaiming-normal convs,
    unit BatchNorm) drawn from ``seed``: a fixed random-feature encoder.
    """

    def __init__(self, stages: int = 1, seed: int = 0):
        super().__init__()
        if stages not in (1, 2, 3, 4):
            raise ValueError(f"ResNet50Encoder: stages must be 1, 2, 3 or 4, got {stages}")
        self.stages = stages
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        in_channels = 64
        for index in range(stages):
            planes = 64 * 2**index
            blocks = [Bottleneck(in_channels, planes, stride=1 if index == 0 else 2)]
            blocks += [Bottleneck(planes * 4, planes) for _ in range(RESNET50_BLOCKS[index] - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*blocks))
            in_channels = planes * 4
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in self.modules():
                if isinstance(module, nn.Conv2d):
                    fan_out = module.out_channels * math.prod(module.kernel_size)
                    module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * math.sqrt(2 / fan_out))
        self.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> ResNet50Encoder:
        """Always stays in eval mode (frozen BatchNorm statistics)."""
        return super().train(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for index in range(self.stages):
            x = getattr(self, f"layer{index + 1}")(x)
        return x


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors from a ``.safetensors`` file or a torch checkpoint (``.pth``/``.pt``, loaded with
    weights_only=True); a checkpoint's "state_dict"/"model" entry is used when present and a
    "module." prefix (DataParallel) is removed."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"encoder weights file {path} does not exist")
    if not path.is_file():
        raise ValueError(f"encoder weights {path} is not a file")
    if path.stat().st_size == 0:
        raise ValueError(f"encoder weights {path} is empty (0 bytes)")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise ValueError(f"cannot read encoder weights {path}: {type(error).__name__}: {error}") from error
    else:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as error:
            raise ValueError(f"cannot read encoder weights {path}: {type(error).__name__}: {error}") from error
        for key in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"encoder weights {path}: expected a state dict, got {type(state).__name__}")
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def load_encoder_weights(encoder: ResNet50Encoder, path: str | Path) -> None:
    """Load a (torchvision-named) ResNet-50 state dict into ``encoder``; keys of stages it does
    not have (and ``fc``) are ignored, missing or mis-shaped ones raise ValueError."""
    state = read_state_dict(path)
    expected = encoder.state_dict()
    missing = [key for key in expected if key not in state]
    if missing:
        raise ValueError(
            f"encoder weights {path} lack {len(missing)} ResNet-50 tensor(s), e.g. {missing[:5]}; "
            "expected a torchvision-style resnet50 state dict (conv1.weight, bn1.*, layer1.0.conv1.weight, ...)"
        )
    wrong = [
        f"{key}: {tuple(state[key].shape)} != {tuple(value.shape)}"
        for key, value in expected.items()
        if state[key].shape != value.shape
    ]
    if wrong:
        raise ValueError(f"encoder weights {path} have mis-shaped tensors: {wrong[:5]}")
    encoder.load_state_dict({key: state[key] for key in expected})


def non_finite_tensors(module: nn.Module) -> list[str]:
    """The names of ``module``'s floating-point weights and buffers that hold a NaN or an infinity."""
    return [
        name
        for name, value in module.state_dict().items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's bytes (hex), read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def state_sha256(module: nn.Module) -> str:
    """The sha256 (hex) of a module's state dict: every tensor's name, shape, dtype and bytes, in order."""
    digest = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def configured_model(config) -> nn.Module:
    """The restoration network a trainer configuration asks for (--model, --width, --depth, --modality,
    --raw-input, --unet-output)."""
    return build_model(
        config.model, config.width, config.depth, config.modality == "raw", config.raw_input, config.unet_output
    )
