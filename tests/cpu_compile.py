"""The XLA flag every CPU test run compiles with, in-process (tests/conftest.py) and in the
processes tests start (the trainer, the benchmark scripts).

`--xla_backend_optimization_level=0` turns LLVM's optimisation passes off. They are about half of
XLA:CPU's compile time, and compiling, not running, is most of nearly every test here: the programs
are tiny and run a few steps (the suite: 44.6 → 24.6 CPU-minutes, 31 → 13 min on 2 cores). XLA's
own HLO passes, fusion, sharding and buffer assignment are unchanged, so what is compiled and what
tests inspect of it (HLO text, memory analysis) stay the same; only the CPU code is less optimised.
Runs of many steps may do better without it (tests/test_trainer.py's SIGKILL test). Not for GPU
runs: there it would lower the level of XLA's GPU code generation too.
"""

FAST_COMPILE = "--xla_backend_optimization_level=0"
