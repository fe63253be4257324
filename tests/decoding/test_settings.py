"""Tests of decoding/settings.py: SamplingConfig is validated once, when made, is hashable
with plain scalars, and says when the sampler's log-probs are a train step's targets."""

import dataclasses

import numpy as np
import pytest

from thack_jax.decoding.settings import SamplingConfig


def test_defaults_and_normalised_scalars():
    s = SamplingConfig(max_decode_len=np.int64(8), temperature=1, top_p=1)
    assert (s.num_samples, s.top_k, s.draw) == (1, 0, "inverse_cdf")
    assert type(s.max_decode_len) is int and type(s.temperature) is float
    assert s == SamplingConfig(max_decode_len=8) and hash(s) == hash(
        SamplingConfig(max_decode_len=8)
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.temperature = 2.0
    with pytest.raises(TypeError):
        SamplingConfig(8)  # keyword-only: the fields are never given by position


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(max_decode_len=0), "max_decode_len=0 must be an integer >= 1"),
        (dict(max_decode_len=2.5), "max_decode_len=2.5"),
        (dict(num_samples=0), "num_samples=0"),
        (dict(num_samples=True), "num_samples=True"),
        (dict(temperature=-1.0), "temperature=-1.0"),
        (dict(top_k=-1), "top_k=-1"),
        (dict(top_p=0.0), r"top_p=0.0 must be in \(0, 1\]"),
        (dict(top_k=3, top_p=0.5), "both set"),
        (dict(draw="multinomial"), "draw='multinomial'"),
    ],
)
def test_bad_settings_are_refused_when_made(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingConfig(**{"max_decode_len": 4, **kwargs})


def test_gives_distillation_targets():
    assert SamplingConfig(max_decode_len=4).gives_distillation_targets(1.0)
    assert not SamplingConfig(max_decode_len=4).gives_distillation_targets(2.0)
    assert SamplingConfig(max_decode_len=4, temperature=2).gives_distillation_targets(2.0)
    for cut in (dict(top_k=5), dict(top_p=0.9)):
        s = SamplingConfig(max_decode_len=4, **cut)
        assert s.truncated and not s.gives_distillation_targets(1.0)
    assert not SamplingConfig(max_decode_len=4, temperature=0.0).gives_distillation_targets(1.0)
