"""Runs an ONNX model with onnxruntime on a raw little-endian f32 input and writes the raw f32
output, and with METADATA.json the model's metadata_props as onnxruntime reads them: the check
of sae-models' ONNX export (`crates/sae-models/tests/onnx.rs`).

    python run_onnx.py MODEL.onnx INPUT.f32 N C H W OUTPUT.f32 [METADATA.json]
"""

import json
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
    if len(sys.argv) > 8:
        with open(sys.argv[8], "w") as f:
            json.dump(session.get_modelmeta().custom_metadata_map, f)


if __name__ == "__main__":
    main()
