"""Pallas GPU kernels (installed as `jaxtune.kernels`). One file per kernel, each with its
`custom_vjp` wiring, a frozen `BlockSizes` and a plain-jnp reference at the bottom."""

# Off a GPU the kernels run in Pallas interpret mode, whose first lowering imports jax's Mosaic
# interpreters lazily; those modules register jax config options, which changes the trace context,
# so every function jitted before then compiles again on its next call (a CPU trainer run: its second
# step took 16 s instead of 0.3). Imported here, up front, they change nothing later.
try:
    import jax._src.pallas.mosaic.interpret.interpret_pallas_call  # noqa: F401
    import jax._src.pallas.mosaic_gpu.interpret.interpret_pallas_call  # noqa: F401
except Exception:  # another jax layout, or one that fails to import here: at worst the recompiles above
    pass
