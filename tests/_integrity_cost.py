"""Cost of the integrity checks on a finished experiment's workdir (docs/reliability.md):

    python3 launch/train.py --gin_file=experiments/default.gin --workdir=/tmp/wd
    python3 tests/_integrity_cost.py /tmp/wd experiments/default.gin

Prints medians of 5 timings and the load average before and after (the box is shared:
a figure taken while something else ran is not a result).
"""

from __future__ import annotations

import os
import statistics
import sys
import time


def _median_seconds(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(workdir: str, gin_file: str) -> None:
    from thack_jax.data.offline_store import OfflineStore
    from thack_jax.experiment import gin_registry, runner
    from thack_jax.models import hf

    gin_registry.parse([gin_file], [], [])
    exp = runner.Experiment(gin_registry.experiment_config(), workdir, progress=False)
    print("load average", os.getloadavg())

    def stage_digests():
        exp._verified.clear()
        for stage in runner.SHARED_STAGES:
            exp.stage_outputs(stage)

    print(f"stage output digests (shared stages): {_median_seconds(stage_digests):.4f} s")
    for store in [os.path.join(workdir, "oracle_data")] + [
        os.path.join(workdir, "runs", r, "offline_data")
        for r in sorted(os.listdir(os.path.join(workdir, "runs")))
        if os.path.isdir(os.path.join(workdir, "runs", r, "offline_data"))
    ]:
        verified = _median_seconds(lambda s=store: OfflineStore.open(s))
        plain = _median_seconds(lambda s=store: OfflineStore.open(s, verify_checksums=False))
        print(f"{store}: open {verified:.4f} s verified, {plain:.4f} s unverified")
    teacher = os.path.join(workdir, "teacher", "model")
    seconds = _median_seconds(lambda: hf.load_hf_checkpoint(teacher))
    print(f"load_hf_checkpoint(teacher): {seconds:.4f} s")
    print("load average", os.getloadavg())


if __name__ == "__main__":
    main(*sys.argv[1:3])
