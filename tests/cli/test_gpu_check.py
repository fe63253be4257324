"""launch/gpu_check.py runs (smoke sizes, CPU) where TensorFlow, seqio, gin and tfds are absent."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# Not on the GPU image (jax[cuda], flax, optax, orbax, chex, numpy only).
BLOCKED = ("tensorflow", "seqio", "gin", "tensorflow_datasets", "tensorboardX", "torch")

_RUNNER = textwrap.dedent(
    """
    import importlib.abc, runpy, sys
    BLOCKED = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked import of {name} (absent on the GPU image)")
            return None

    sys.meta_path.insert(0, Block())
    sys.argv = ["launch/gpu_check.py"] + sys.argv[2:]
    try:
        runpy.run_path("launch/gpu_check.py", run_name="__main__")
    finally:
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
        print("LOADED_BLOCKED " + ",".join(loaded))
        print("LOADED_DATA " + str(any(m.startswith("thack_jax.data") for m in sys.modules)))
    """
)


@pytest.mark.slow
def test_gpu_check_smoke_on_cpu_without_tf_seqio_gin(tmp_path):
    out = tmp_path / "figures.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
    args = [",".join(BLOCKED), "--smoke", "--platform=cpu", f"--json_out={out}"]
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    assert "LOADED_BLOCKED \n" in proc.stdout + "\n"
    assert "LOADED_DATA False" in proc.stdout
    assert "correctness: PASS" in proc.stdout
    assert "| tiny | tiny |" in proc.stdout  # the speed table
    figures = json.loads(out.read_text())
    assert figures["correctness"]["pass_greedy"] and figures["correctness"]["pass_params"]
    assert figures["correctness"]["max_update"] > 0  # the step changed the parameters
    assert figures["train"][0]["tokens_per_s"] > 0 and 0 < figures["train"][0]["mfu"]
    assert figures["sampling"][0]["tokens_per_s"] > 0
    assert figures["peak_flops"] > 0


def test_gpu_check_refuses_to_run_without_a_gpu():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "launch/gpu_check.py", "--platform=gpu"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 2
    assert "no GPU" in proc.stderr
