"""Import every module of spmd_diff (and spmd_diff.kernels), so a dependency missing from setup.py fails CI by name.

Modules that need a GPU-only package (NVSHMEM, CuPy) import it lazily, inside the functions that use it.
"""

import importlib
import pkgutil
import sys

import spmd_diff

failed = []
names = ["spmd_diff"] + [m.name for m in pkgutil.walk_packages(spmd_diff.__path__, "spmd_diff.")
                        if not m.name.endswith(".__main__")]  # __main__ runs the CLI
for name in names:
    try:
        importlib.import_module(name)
    except Exception as exc:  # noqa: BLE001 - report every module that fails, then fail
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
for line in failed:
    print(f"cannot import {line}", file=sys.stderr)
print(f"imported {len(names) - len(failed)} of {len(names)} modules")
sys.exit(1 if failed else 0)
