"""PyTorch side of `cargo xtask bench-train`: the same networks as sae's registry (ResNet-50,
SE-ResNet-50, SENetV2-ResNet-50, SENetV2-ResNet-14b with the ImageNet stem, r = 32, K = 4, the
`u + u*s` gate, no convolution bias; or in the paper's Keras convention, a row's fifth field
`keras`: a bias on every convolution and BatchNorm eps 1.001e-5), timed the same way, on CPU with a fixed thread count or
on CUDA (`cargo xtask gpu-check`: synchronised steps, cuDNN benchmark mode, and the variant
`channels_last_bf16`: channels-last memory format with bf16 autocast), and with bf16 autocast
alone (`autocast_bf16`, bench-train's `--bf16` rows on CPU).

Prints one JSON object per line: a `matmul` line (this machine's sgemm GFLOP/s through
PyTorch; not with --skip-matmul), then one line per requested row with its parameter count,
images/s and resident memory (before the model was built, and the process's peak).

    python bench_train.py --threads 2 --seconds 10 --rows resnet50:32:16:train,resnet50:140:1:infer,senetv2_resnet50:64:32:train:keras
    python bench_train.py --device cuda --variant channels_last_bf16 --rows senetv2_resnet50:224:64:train
"""

import contextlib

import argparse
import json
import resource
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class Excitation(nn.Module):
    """SE (one branch) or SaE (K branches): pool -> K x (C -> C/r, ReLU) -> concat -> C -> sigmoid."""

    def __init__(self, channels, reduction, branches):
        super().__init__()
        hidden = channels // reduction
        self.fc1 = nn.ModuleList(nn.Linear(channels, hidden) for _ in range(branches))
        self.fc2 = nn.Linear(hidden * branches, channels)

    def forward(self, x):
        z = x.mean((2, 3))
        h = torch.cat([F.relu(fc(z)) for fc in self.fc1], dim=1)
        s = torch.sigmoid(self.fc2(h))[:, :, None, None]
        return x + x * s


def conv_bn(cin, cout, k, stride, keras):
    """Convolution + BatchNorm; in the Keras convention with a convolution bias and Keras's eps."""
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=keras),
                         nn.BatchNorm2d(cout, eps=1.001e-5 if keras else 1e-5))


class Bottleneck(nn.Module):
    def __init__(self, cin, planes, stride, attention, keras):
        super().__init__()
        out = planes * 4
        self.c1 = conv_bn(cin, planes, 1, 1, keras)
        self.c2 = conv_bn(planes, planes, 3, stride, keras)
        self.c3 = conv_bn(planes, out, 1, 1, keras)
        self.se = {"none": None, "se": Excitation(out, 32, 1), "sae": Excitation(out, 32, 4)}[attention]
        self.down = conv_bn(cin, out, 1, stride, keras) if stride != 1 or cin != out else None

    def forward(self, x):
        y = F.relu(self.c1(x))
        y = F.relu(self.c2(y))
        y = self.c3(y)
        if self.se is not None:
            y = self.se(y)
        return F.relu(y + (self.down(x) if self.down is not None else x))


class ResNet(nn.Module):
    def __init__(self, layers, attention, num_classes, keras=False):
        super().__init__()
        self.stem = conv_bn(3, 64, 7, 2, keras)
        blocks, cin = [], 64
        for stage, count in enumerate(layers):
            planes = 64 << stage
            for i in range(count):
                blocks.append(Bottleneck(cin, planes, 2 if stage > 0 and i == 0 else 1, attention, keras))
                cin = planes * 4
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        y = F.max_pool2d(F.relu(self.stem(x)), 3, 2, 1)
        return self.fc(self.blocks(y).mean((2, 3)))


MODELS = {
    "resnet50": ([3, 4, 6, 3], "none"),
    "seresnet50": ([3, 4, 6, 3], "se"),
    "senetv2_resnet50": ([3, 4, 6, 3], "sae"),
    "resnet14b": ([1, 1, 1, 1], "none"),
    "seresnet14b": ([1, 1, 1, 1], "se"),
    "senetv2_resnet14b": ([1, 1, 1, 1], "sae"),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(step, seconds, device=torch.device("cpu")):
    """Median seconds of `step` after two warm-up calls, over at least 3 calls and `seconds`."""
    step()
    step()
    sync(device)
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < seconds:
        t = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times), len(times)


def resident_bytes():
    """VmRSS of this process (Linux), bytes; 0 where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def bench_row(name, size, batch, mode, seconds, device, variant, convention="pytorch"):
    baseline = resident_bytes()
    torch.manual_seed(0)
    layers, attention = MODELS[name]
    model = ResNet(layers, attention, 100, keras=convention == "keras").to(device)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 100, (batch,), device=device)
    autocast = contextlib.nullcontext
    if variant == "channels_last_bf16":
        model = model.to(memory_format=torch.channels_last)
        x = x.to(memory_format=torch.channels_last)
    if variant in ("channels_last_bf16", "autocast_bf16"):
        def autocast():
            return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    if mode == "train":
        model.train()
        opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-7)

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    else:
        # Realistic running statistics first, as `cargo xtask bench-train` does (WARM_STAT_FORWARDS).
        model.train()
        with torch.no_grad(), autocast():
            for _ in range(20):
                model(x)
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(x)

    median, steps = timed(step, seconds, device)
    params = sum(p.numel() for p in model.parameters())
    # ru_maxrss is in KiB on Linux: the peak of the whole process, this row being its only one
    # when `cargo xtask bench-train` runs it.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"model": name, "size": size, "batch": batch, "mode": mode, "variant": variant,
            "convention": convention, "params": params,
            "baseline_rss": baseline, "peak_rss": peak,
            "images_per_second": batch / median, "steps": steps}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rows", default="", help="model:size:batch:train|infer[:keras], comma-separated")
    ap.add_argument("--skip-matmul", action="store_true", help="no matmul line (bench-train times it once)")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--variant", default="eager", choices=["eager", "autocast_bf16", "channels_last_bf16"])
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cudnn.benchmark = True
    if not args.skip_matmul:
        a, b = torch.randn(2048, 2048, device=device), torch.randn(2048, 2048, device=device)
        median, _ = timed(lambda: a @ b, 2.0, device)
        print(json.dumps({"matmul_gflops": 2 * 2048**3 / median / 1e9, "torch": torch.__version__,
                          "threads": torch.get_num_threads()}), flush=True)
    for row in filter(None, args.rows.split(",")):
        name, size, batch, mode, *convention = row.split(":")
        convention = convention[0] if convention else "pytorch"
        if convention not in ("pytorch", "keras"):
            ap.error(f"row {row}: convention {convention!r} is neither pytorch nor keras")
        print(json.dumps(bench_row(name, int(size), int(batch), mode, args.seconds, device, args.variant,
                                   convention)), flush=True)


if __name__ == "__main__":
    main()
