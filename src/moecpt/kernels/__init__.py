"""Fused or memory-lean versions of the model's operations, each beside its plain PyTorch reference."""
