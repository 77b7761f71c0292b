"""Engines: torch/transformers/torchao code. Import only inside functions of the layers above."""
