"""Pallas GPU kernels (installed as `jaxtune.kernels`). One file per kernel, each with its
`custom_vjp` wiring, a frozen `BlockSizes` and a plain-jnp reference at the bottom."""
