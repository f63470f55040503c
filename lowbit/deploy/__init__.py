"""Deployment: bit-packed .lowbit artifacts (and, later, ONNX export and runtime)."""
