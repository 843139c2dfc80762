"""``capvqa bench``: cost of a pipeline's stages on the real architectures with random weights."""
