"""`python launch/gpu_check.py ...` runs `python -m thack_jax.cli.gpu_check ...`.

A thin shim kept so the documented commands work from a checkout; the code lives in
`thack_jax/cli/gpu_check.py` (install the package first: `pip install -e .`).
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("thack_jax.cli.gpu_check", run_name="__main__", alter_sys=True)
