"""core/interrupt.py: SIGTERM / SIGINT become a stop request inside handling()."""

import os
import signal

import pytest

from thack_jax.core import interrupt


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_signal_sets_the_request_and_check_raises(signum):
    with interrupt.handling():
        assert interrupt.requested() is None
        interrupt.check("nowhere")  # nothing requested: no error
        os.kill(os.getpid(), signum)
        assert interrupt.requested() == signum
        with pytest.raises(interrupt.Interrupted) as info:
            interrupt.check("during step 3")
    name = signal.Signals(signum).name
    assert str(info.value) == (
        f"interrupted by {name} during step 3; rerun the same command to resume"
    )
    assert info.value.exit_code == 128 + signum


def test_handlers_are_restored_and_nesting_keeps_the_request():
    before = signal.getsignal(signal.SIGTERM)
    with interrupt.handling():
        with interrupt.handling():  # the trainer's, inside the runner's
            os.kill(os.getpid(), signal.SIGTERM)
        # The inner block must neither clear the request nor restore the default handler.
        assert interrupt.requested() == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    with interrupt.handling():  # a new outermost block starts clean
        assert interrupt.requested() is None
