"""Gated ResNets and BlockDrop policy networks."""
