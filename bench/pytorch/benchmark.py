"""The PyTorch side of `sae benchmark --pytorch PYTHON`: an sae model config's network, built by
senetv2.py (beside this file), timed as sae times its own (`sae_train::bench`): random inputs;
one warm-up step, then the median over at least 3 steps and `--seconds`. A training step is
forward, cross-entropy, backward and the optimiser's step; inference runs in eval mode under
`torch.inference_mode` after 20 training-mode forwards have set BatchNorm's running statistics.
`--bf16` runs under `torch.autocast(dtype=torch.bfloat16)`. Prints one JSON object.

    python benchmark.py MODEL.json --size 224 --batch 32 --mode train --seconds 5 --threads 2
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F

import senetv2


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("config", help="an sae model config (JSON)")
    ap.add_argument("--size", type=int, required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--mode", choices=["train", "infer"], required=True)
    ap.add_argument("--seconds", type=float, required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--optimizer", choices=["sgd", "adam", "adamw"], default="sgd")
    ap.add_argument("--bf16", action="store_true")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with open(args.config) as f:
        cfg = json.load(f)
    model = senetv2.from_config(cfg).to(device)
    classes = (cfg if "arch" in cfg else cfg["model"])["num_classes"]
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, classes, (args.batch,), device=device)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=args.bf16)

    if args.mode == "train":
        model.train()
        params = model.parameters()
        opt = {
            # sae's defaults (OptimizerConfig::default_named).
            "sgd": lambda: torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4),
            "adam": lambda: torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-7),
            "adamw": lambda: torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2),
        }[args.optimizer]()

        def step():
            opt.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

    else:
        model.train()
        with torch.no_grad(), autocast():
            for _ in range(20):
                model(x)
        model.eval()

        def step():
            with torch.inference_mode(), autocast():
                model(x)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    step()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < 3 or time.perf_counter() - start < args.seconds:
        t = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t)
    median = sorted(times)[len(times) // 2]  # the upper median, as sae_train::bench::median
    print(json.dumps({
        "step_seconds": median,
        "images_per_second": args.batch / median,
        "steps": len(times),
        "params": sum(p.numel() for p in model.parameters()),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }))


if __name__ == "__main__":
    main()
