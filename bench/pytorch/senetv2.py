"""sae's models in PyTorch: ResNet, ResNeXt, SE-ResNet and SENetV2 (SaE) ResNets, and MobileNet
v1, built from an sae model config, with sae's tensor names, so that a state dict written by
`sae export --format pytorch` loads into it strictly. One file, needing torch only.

    import json, senetv2
    from safetensors.torch import load_file
    model = senetv2.from_config(json.load(open("model.json")))   # written beside the weights
    model.load_state_dict(load_file("model.safetensors"))

Everything sae's config can say is followed: basic or bottleneck blocks, groups and group width
(ResNeXt), the ImageNet (7x7/2 conv, 3x3/2 max-pool) or CIFAR (3x3/1 conv) stem, convolution
biases (the paper's Keras convention), BatchNorm epsilon, and the excitation: none, SE (one
reduction layer) or SaE (K reduction layers side by side, concatenated), reduction r with
timm's optional rounding of C / r, and the gate `u * s` or `u + u * s`; for MobileNet v1 the
width multiplier and the stem's stride.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def reduced_width(channels, reduction, divisor):
    """C / r, or timm's make_divisible(C / r, d) when a divisor is given (nearest multiple, at least d)."""
    if not divisor:
        return channels // reduction
    return max(divisor, int(channels / reduction + divisor / 2) // divisor * divisor)


class Excitation(nn.Module):
    """SE (`branches` None: one reduction layer named fc1) or SaE (`branches` K: fc1.0 ... fc1.K-1).
    The dense layers are 1x1 convolutions on the pooled map, as timm's SE stores them."""

    def __init__(self, channels, reduced, branches, gate):
        super().__init__()
        if branches is None:
            self.fc1 = nn.Conv2d(channels, reduced, 1)
        else:
            self.fc1 = nn.ModuleList(nn.Conv2d(channels, reduced, 1) for _ in range(branches))
        count = 1 if branches is None else branches
        self.fc2 = nn.Conv2d(reduced * count, channels, 1)
        self.gate = gate

    def forward(self, u):
        z = u.mean((2, 3), keepdim=True)
        layers = [self.fc1] if isinstance(self.fc1, nn.Conv2d) else list(self.fc1)
        hidden = torch.cat([F.relu(fc(z)) for fc in layers], dim=1)
        s = torch.sigmoid(self.fc2(hidden))
        return u * s if self.gate == "s" else u + u * s


class Block(nn.Module):
    """A residual block: conv{1,2[,3]} with bn{1,2[,3]}, the excitation `se`, the shortcut `downsample`."""

    def __init__(self, cfg, bottleneck, in_ch, planes, stride):
        super().__init__()
        arch, bias, eps = cfg["arch"], cfg["conv_bias"], cfg["bn_eps"]
        if bottleneck:
            width = planes * arch["width_per_group"] // 64 * arch["groups"]
            out = planes * 4
            shapes = [(in_ch, width, 1, 1, 1), (width, width, 3, stride, arch["groups"]), (width, out, 1, 1, 1)]
        else:
            out = planes
            shapes = [(in_ch, planes, 3, stride, 1), (planes, planes, 3, 1, 1)]
        self.depth = len(shapes)
        for i, (cin, cout, k, s, g) in enumerate(shapes, start=1):
            setattr(self, f"conv{i}", nn.Conv2d(cin, cout, k, s, k // 2, groups=g, bias=bias))
            setattr(self, f"bn{i}", nn.BatchNorm2d(cout, eps=eps))
        attention = cfg["attention"]
        if attention == "none":
            self.se = None
        else:
            reduced = reduced_width(out, cfg["reduction"], cfg.get("reduction_divisor"))
            branches = cfg["cardinality"] if attention == "sae" else None
            self.se = Excitation(out, reduced, branches, cfg["gate"])
        if stride != 1 or in_ch != out:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out, 1, stride, 0, bias=bias), nn.BatchNorm2d(out, eps=eps))
        else:
            self.downsample = None

    def forward(self, x):
        y = x
        for i in range(1, self.depth + 1):
            y = getattr(self, f"bn{i}")(getattr(self, f"conv{i}")(y))
            if i < self.depth:
                y = F.relu(y)
        if self.se is not None:
            y = self.se(y)
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class ResNet(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        arch = cfg["arch"]
        if arch["family"] != "resnet":
            raise ValueError(f"{cfg['name']}: only sae's ResNet family is here, not {arch['family']}")
        bias, eps = cfg["conv_bias"], cfg["bn_eps"]
        imagenet = cfg["stem"] == "imagenet"
        k, s = (7, 2) if imagenet else (3, 1)
        self.conv1 = nn.Conv2d(cfg["in_channels"], 64, k, s, k // 2, bias=bias)
        self.bn1 = nn.BatchNorm2d(64, eps=eps)
        self.pool = imagenet
        bottleneck = arch["block"] == "bottleneck"
        in_ch = 64
        for stage, count in enumerate(arch["layers"]):
            planes = 64 << stage
            blocks = []
            for i in range(count):
                blocks.append(Block(cfg, bottleneck, in_ch, planes, 2 if stage > 0 and i == 0 else 1))
                in_ch = planes * (4 if bottleneck else 1)
            setattr(self, f"layer{stage + 1}", nn.Sequential(*blocks))
        self.stages = len(arch["layers"])
        self.fc = nn.Linear(in_ch, cfg["num_classes"])

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        if self.pool:
            y = F.max_pool2d(y, 3, 2, 1)
        for stage in range(1, self.stages + 1):
            y = getattr(self, f"layer{stage}")(y)
        return self.fc(y.mean((2, 3)))


# MobileNet v1's 13 depthwise-separable blocks: (output channels, stride).
MOBILENET_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [(1024, 2), (1024, 1)]


class MobileNetV1(nn.Module):
    """conv_stem/bn1, then blocks.i.{conv_dw, bn1, conv_pw, bn2}, ReLU6 after every BatchNorm."""

    def __init__(self, cfg):
        super().__init__()
        alpha, bias, eps = cfg["arch"]["width_multiplier"], cfg["conv_bias"], cfg["bn_eps"]

        def width(c):
            return max(1, int(c * alpha))

        def conv_bn(cin, cout, stride, groups, conv, bn, owner):
            k = 3 if groups > 1 or conv == "conv_stem" else 1
            setattr(owner, conv, nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias))
            setattr(owner, bn, nn.BatchNorm2d(cout, eps=eps))

        conv_bn(cfg["in_channels"], width(32), 2 if cfg["stem"] == "imagenet" else 1, 1, "conv_stem", "bn1", self)
        self.blocks = nn.ModuleList()
        cin = width(32)
        for out, stride in MOBILENET_BLOCKS:
            block = nn.Module()
            conv_bn(cin, cin, stride, cin, "conv_dw", "bn1", block)
            conv_bn(cin, width(out), 1, 1, "conv_pw", "bn2", block)
            self.blocks.append(block)
            cin = width(out)
        self.classifier = nn.Linear(cin, cfg["num_classes"])

    def forward(self, x):
        y = F.relu6(self.bn1(self.conv_stem(x)))
        for b in self.blocks:
            y = F.relu6(b.bn1(b.conv_dw(y)))
            y = F.relu6(b.bn2(b.conv_pw(y)))
        return self.classifier(y.mean((2, 3)))


def from_config(cfg):
    """The network of an sae model config: a dict of `sae export --format pytorch`'s (or `sae
    convert`'s) .json, or a run's config.json, whose "model" it takes."""
    cfg = cfg if "arch" in cfg else cfg["model"]
    return MobileNetV1(cfg) if cfg["arch"]["family"] == "mobilenet_v1" else ResNet(cfg)
