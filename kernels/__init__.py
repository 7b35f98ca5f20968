"""Tile kernels for the hot paths. Each file holds one op: its plain-jnp reference (also the XLA path), its Pallas
kernel(s) and a wrapper that checks shapes; `ops` picks the implementation."""
