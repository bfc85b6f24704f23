"""Onboard inference: bundle -> Policy (onnxruntime or TensorRT), ODE solvers, latency profiling."""
