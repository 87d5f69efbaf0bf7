"""Built-in model architectures and how they are prepared."""
