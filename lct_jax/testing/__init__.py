"""Test-only helpers (oracles, shims). Runtime code never imports this package."""
