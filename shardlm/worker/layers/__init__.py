"""Parallel building blocks; communication is written in each layer's forward."""
