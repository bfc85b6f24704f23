"""Workstation side of edge-vla: reference VLA, training, distillation, ONNX export, quantization,
TensorRT lint and engine builds, bundle writing. Needs the `export` extra (torch, onnx)."""
