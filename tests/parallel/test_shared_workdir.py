"""A multi-process run refuses a workdir its processes do not share (each host's own disk),
and accepts a shared one. Two CPU processes of one JAX job; 'each host's own disk' is
simulated by giving each process its own local folder."""

from __future__ import annotations

import textwrap

from test_distributed import parse_result, run_processes

_WORKER = textwrap.dedent(
    """
    import json
    from thack_jax.core import storage
    from thack_jax.parallel import distributed
    distributed.initialize(initialization_timeout=60)
    import jax
    workdir = {workdirs}[jax.process_index()]
    try:
        distributed.check_shared_workdir(workdir)
        outcome = "accepted"
    except distributed.WorkdirNotSharedError as e:
        outcome = str(e)
    leftovers = storage.listdir(storage.join(workdir, distributed.SHARED_CHECK_DIR))
    print("RESULT " + json.dumps({{"outcome": outcome, "leftovers": leftovers}}), flush=True)
    """
)


def _run(workdirs):
    script = _WORKER.format(workdirs=repr([str(w) for w in workdirs]))
    return [parse_result(r) for r in run_processes(script, devices_per_process=1)]


def test_one_folder_per_host_is_refused_naming_the_blind_process(tmp_path):
    results = _run([tmp_path / "host0", tmp_path / "host1"])
    for result in results:  # every process raises, not only the blind one
        assert result["outcome"].startswith(f"workdir {tmp_path}/host"), result
        assert "process(es) [1] cannot read" in result["outcome"]
        assert "Use a gs:// workdir" in result["outcome"]


def test_a_shared_folder_is_accepted_and_left_clean(tmp_path):
    results = _run([tmp_path / "shared", tmp_path / "shared"])
    assert results == [{"outcome": "accepted", "leftovers": []}] * 2
