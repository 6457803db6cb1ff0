"""Runtimes: where the trainers run and how tensors move between them (central, sim, torchrun)."""
