"""Image sources, robust decoding, iBOT masks and DINOv2 multi-crop: pure Python, no Ray."""
