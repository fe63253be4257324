"""The names of the mesh axes and the default mesh shape (standard library only).

Kept apart from `partitioning.py` (which imports jax) so that `experiment/config.py` can
default `ExperimentConfig.mesh_shape` to `DEFAULT_MESH_SHAPE` without importing jax. With
`partitioning.py` these are the only places that name a mesh axis
(tests/parallel/test_partitioning.py checks it); everything else uses logical axis names.
"""

DATA = "data"
FSDP = "fsdp"
MODEL = "model"
# Canonical mesh order: `model` innermost, so model-parallel groups are neighbouring devices.
MESH_AXES = (DATA, FSDP, MODEL)
# The default mesh: pure data parallelism over all devices, as (axis, size) pairs (-1 = all
# the devices). ExperimentConfig.mesh_shape stores exactly this, so fingerprints keep it.
DEFAULT_MESH_SHAPE: tuple[tuple[str, int], ...] = ((DATA, -1),)
