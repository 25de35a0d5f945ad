"""Loads a state dict that `sae export --format pytorch` wrote into the torchvision or timm
model it was converted from, strictly, and prints the largest difference of its eval-mode
logits from the ones `export_checkpoints.py` saved for that model: the check that our weights
go back to PyTorch (`crates/sae-models/tests/torch_interop.rs`).

    python load_state_dict.py NAME STATE.safetensors NAME.io.safetensors

Prints one JSON object: {"max_diff": ..., "scale": ...} (scale: the largest logit).
"""

import json
import sys

import torch
from safetensors.torch import load_file

from export_checkpoints import MODELS


def main():
    name, state, io = sys.argv[1:4]
    torch.set_num_threads(1)
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
