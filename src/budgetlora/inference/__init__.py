"""Inference on a finished run: load it and prove the reload, predict and evaluate, export (merged, ONNX), serve
(torch or onnxruntime)."""
