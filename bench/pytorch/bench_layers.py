"""PyTorch side of `cargo xtask bench-layers`: one convolution at a time (no bias, padding
k // 2, as ResNet-50's), forward and backward timed the way the Rust side times them.

The forward runs with autograd recording, as in training. The backward is the convolution's
alone: the output is computed once and `torch.autograd.grad` takes the gradients of the input
(unless the shape's last element is false, as for the stem, whose input is the image) and of
the weight from an all-ones output gradient, with the graph kept for the next call.

Prints one JSON object per line: the torch version, then one line per shape with the median
forward and backward milliseconds.

    python bench_layers.py --threads 2 --seconds 1 --shapes '[[16, 64, 35, 35, 256, 1, 1, true]]'

Each shape is [batch, in channels, height, width, out channels, kernel, stride, input gradient].
With `--precision bf16` the input is bf16 and the f32 weight is used under
`torch.autocast("cpu", dtype=torch.bfloat16)`, as in autocast training (the input arrives as
the bf16 output of the layer before; the weight is cast on every call).
"""

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F


def median_ms(fn, seconds):
    """Median milliseconds of `fn` over at least `seconds` and 5 calls, after 2 warm-up calls."""
    fn()
    fn()
    times = []
    start = time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=1.0)
    ap.add_argument("--shapes", required=True, help="JSON list of [n, c, h, w, o, k, s, input_gradient]")
    ap.add_argument("--precision", choices=["f32", "bf16"], default="f32")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    bf16 = args.precision == "bf16"
    print(json.dumps({"torch": torch.__version__}), flush=True)
    for n, c, h, w, o, k, s, input_gradient in json.loads(args.shapes):
        x = torch.randn(n, c, h, w)
        x = (x.bfloat16() if bf16 else x).requires_grad_(input_gradient)
        weight = (torch.randn(o, c, k, k) * 0.1).requires_grad_()

        def conv():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return F.conv2d(x, weight, stride=s, padding=k // 2)

        forward_ms = median_ms(conv, args.seconds)
        y = conv()
        ones = torch.ones_like(y)
        inputs = [x, weight] if input_gradient else [weight]
        backward_ms = median_ms(lambda: torch.autograd.grad(y, inputs, ones, retain_graph=True), args.seconds)
        print(json.dumps({"shape": [n, c, h, w, o, k, s], "forward_ms": forward_ms, "backward_ms": backward_ms}), flush=True)


if __name__ == "__main__":
    main()
