"""Lowering: turn a plan (per-group activation ranges, weight precision) into QDQ ONNX models
for a target profile."""
