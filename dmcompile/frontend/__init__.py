"""Frontend: load a diffusers UNet (zoo name or local folder) and trace it to ONNX."""
