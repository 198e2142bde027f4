"""What tests and benches build on: tiny random models of real architectures (``tiny_models``)."""
