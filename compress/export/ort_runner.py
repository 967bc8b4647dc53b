"""Run one ONNX file on the CPU in whatever onnxruntime the running Python has (an isolated older
release, see runtimes.py). Imports only onnxruntime and numpy: compress is not installed there.

usage: python -I ort_runner.py MODEL.onnx INPUT.npy OUTPUT.npy THREADS
"""
import sys

import numpy as np
import onnxruntime as ort


def main(model: str, inputs: str, outputs: str, threads: str) -> int:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = int(threads), 1
    try:
        sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        out = sess.run(None, {sess.get_inputs()[0].name: np.load(inputs)})[0]
    except Exception as e:  # the runtime's own words are the message: one line
        print(f"onnxruntime {ort.__version__} refuses it: {' '.join(str(e).split())}", file=sys.stderr)
        return 3
    np.save(outputs, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
