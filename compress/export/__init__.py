"""Export: safetensors and ONNX writers, each verified; fusion, int8, older runtimes."""
