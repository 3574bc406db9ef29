"""Calibration: run the full-precision sampler, bucket UNet inputs by timestep group, and keep
bounded per-group statistics of every tensor that gets quantized."""
