"""`python launch/coverage.py ...` runs `python -m thack_jax.cli.coverage ...`.

A thin shim kept so the documented commands work from a checkout; the code lives in
`thack_jax/cli/coverage.py` (install the package first: `pip install -e .`).
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("thack_jax.cli.coverage", run_name="__main__", alter_sys=True)
