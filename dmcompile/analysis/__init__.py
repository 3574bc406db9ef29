"""Rate-distortion analysis and bit allocation: per timestep group, how much each layer's
quantization distorts the UNet output at each bit width, and which widths to choose."""
