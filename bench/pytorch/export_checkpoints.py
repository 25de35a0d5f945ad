"""Writes real torchvision and timm checkpoints, and PyTorch's logits for them, for the
interop test of sae-models (`crates/sae-models/tests/torch_interop.rs`).

For each model: random weights and random BatchNorm statistics (seeded), saved exactly as the
library's `state_dict()` both as `NAME.pth` (torch.save) and `NAME.safetensors`, and
`NAME.io.safetensors` holding a fixed input (`input`, 2x3x64x64) and the eval-mode logits
(`logits`).

    python export_checkpoints.py OUT_DIR [NAME ...]

Names: tv_resnet18 tv_resnet50 tv_resnext50_32x4d timm_resnet50 timm_seresnet50, and
`golden`, which writes the small `state_dict.pth` committed under sae-models' tests (a nested,
`module.`-prefixed state dict with known values, a transposed tensor and an f16 one).
"""

import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

MODELS = {
    "tv_resnet18": lambda: __import__("torchvision").models.resnet18(num_classes=10),
    "tv_resnet50": lambda: __import__("torchvision").models.resnet50(num_classes=10),
    "tv_resnext50_32x4d": lambda: __import__("torchvision").models.resnext50_32x4d(num_classes=10),
    "timm_resnet50": lambda: __import__("timm").create_model("resnet50", num_classes=10),
    "timm_seresnet50": lambda: __import__("timm").create_model("seresnet50", num_classes=10),
}


def randomise(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # Small weights keep a deep network's activations in range in eval mode.
            p.copy_(torch.randn(p.shape, generator=g) * (0.5 / max(1, p[0].numel()) ** 0.5))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand(b.shape, generator=g) + 0.5)
            elif name.endswith("num_batches_tracked"):
                b.fill_(1234)


def export(name, out):
    torch.manual_seed(0)
    model = MODELS[name]()
    randomise(model, 1)
    model.eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(x)
    state = model.state_dict()
    torch.save(state, out / f"{name}.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"{name}.safetensors"))
    save_file({"input": x, "logits": logits}, str(out / f"{name}.io.safetensors"))


def golden(out):
    weight = torch.arange(4 * 3 * 3 * 3, dtype=torch.float32).reshape(4, 3, 3, 3) / 8.0
    fc = torch.arange(6, dtype=torch.float32).reshape(2, 3).t()  # (3, 2), Fortran-ordered
    state = {
        "module.conv1.weight": weight,
        "module.bn1.num_batches_tracked": torch.tensor(7),
        "module.bn1.running_var": torch.tensor([0.5, 1.5, 2.5, 3.5], dtype=torch.float16),
        "module.fc.weight": fc,
    }
    torch.save({"epoch": 3, "state_dict": state}, out / "state_dict.pth")


def main():
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    for name in sys.argv[2:] or list(MODELS):
        if name == "golden":
            golden(out)
        else:
            export(name, out)


if __name__ == "__main__":
    main()
