"""Runs an ONNX model with onnxruntime on a raw little-endian f32 input and writes the raw f32
output: the check of sae-models' ONNX export (`crates/sae-models/tests/onnx.rs`).

    python run_onnx.py MODEL.onnx INPUT.f32 N C H W OUTPUT.f32
"""

import sys

import numpy as np
import onnxruntime as ort


def main():
    model, inp, n, c, h, w, out = sys.argv[1:8]
    x = np.fromfile(inp, dtype="<f4").reshape(int(n), int(c), int(h), int(w))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"input": x})
    logits.astype("<f4").tofile(out)


if __name__ == "__main__":
    main()
