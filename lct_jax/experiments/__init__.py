"""Controlled experiments built from the product's own stages, configs and evaluation (nothing imports them)."""
