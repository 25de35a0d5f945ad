"""Loads a state dict that `sae export --format pytorch` wrote, strictly, into a torchvision or
timm model (a name of `export_checkpoints.py`) or into `senetv2.py`'s network of an sae model
config (MODEL ends in .json), and prints the largest difference of its eval-mode logits from
the expected ones: the check that our weights go back to PyTorch
(`crates/sae-models/tests/torch_interop.rs`).

    python load_state_dict.py MODEL STATE.safetensors IO.safetensors

IO.safetensors holds `input` and the expected `logits`. Prints one JSON object:
{"max_diff": ..., "scale": ...} (scale: the largest expected logit).
"""

import json
import sys

import torch
from safetensors.torch import load_file

import senetv2
from export_checkpoints import MODELS


def main():
    name, state, io = sys.argv[1:4]
    torch.set_num_threads(1)
    if name.endswith(".json"):
        with open(name) as f:
            model = senetv2.from_config(json.load(f))
    else:
        model = MODELS[name]()
    model.load_state_dict(load_file(state), strict=True)
    model.eval()
    expected = load_file(io)
    with torch.no_grad():
        logits = model(expected["input"])
    print(json.dumps({"max_diff": (logits - expected["logits"]).abs().max().item(),
                      "scale": expected["logits"].abs().max().item()}))


if __name__ == "__main__":
    main()
