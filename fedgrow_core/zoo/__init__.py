"""The small pre-trained models clients start from: the named registry, ONNX conversion, ViT pre-training."""
