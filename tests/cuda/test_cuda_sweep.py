"""The CUDA backend against the CPU kernels, bitwise, on random group layouts and histories.

Each example cuts a buffer into param groups (each with its own hyperparameters) and gaps, and
draws a history: the groups frozen at each step and, between steps, a group's ``lr`` changed,
a checkpoint reloaded (the CPU optimizer's checkpoint into a new CUDA optimizer: checkpoints
are device independent) or the state buffers assigned new arrays (halved).  The same history
drives an optimizer on NumPy buffers and one on device buffers; after every step parameters,
state and step counts must be bitwise equal.
"""
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numba import cuda

import flatopt
from group_histories import draw_history

from .test_cuda_sim import assert_same, step_both

pytestmark = [pytest.mark.cudasim, pytest.mark.filterwarnings("ignore::RuntimeWarning")]

OPTIMIZERS = {
    # name: (class, defaults, the two groups' overrides)
    "SGD": (flatopt.SGD, dict(lr=0.05, momentum=0.9), ({}, dict(nesterov=True, weight_decay=0.01))),
    "Momentum": (flatopt.Momentum, dict(lr=0.05), ({}, dict(beta=0.5))),
    "RMSprop": (flatopt.RMSprop, dict(lr=0.01), ({}, dict(centered=True, momentum=0.5))),
    "Adam": (flatopt.Adam, dict(lr=0.01), ({}, dict(amsgrad=True, weight_decay=0.1))),
    "AdamW": (flatopt.AdamW, dict(lr=0.01), ({}, dict(betas=(0.8, 0.99), maximize=True))),
    "ADOPT": (flatopt.ADOPT, dict(lr=0.01), ({}, dict(weight_decay=0.01, decouple=True))),
}
EDITS = ["nothing", "nothing", "lr", "checkpoint", "assign state"]
SWEEP = settings(max_examples=int(os.environ.get("FLATOPT_SWEEP_EXAMPLES", 60)), deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@SWEEP
@given(name=st.sampled_from(sorted(OPTIMIZERS)), n=st.integers(1, 150),
       dtype=st.sampled_from([np.float32, np.float64]), data=st.data())
def test_random_groups_and_history_match_the_cpu_kernels(name, n, dtype, data):
    cls, kw, overrides = OPTIMIZERS[name]
    segments, history, p0, grads = draw_history(data, n, dtype, EDITS, max_steps=4)

    def make():
        return cls(**kw, param_groups=[{"start": a, "stop": b, **overrides[kind]} for a, b, kind in segments])

    cpu, dev = make(), make()
    on_cpu, on_dev = p0.copy(), cuda.to_device(p0)
    for t, (edit, frozen) in enumerate(history):
        if edit == "lr":
            cpu.param_groups[-1]["lr"] = dev.param_groups[-1]["lr"] = 0.5 ** (t + 3)
        elif edit == "checkpoint":
            dev = make()
            dev.load_state_dict(cpu.state_dict())
        elif edit == "assign state":
            for key in sorted(cpu.state):
                cpu.state[key] = cpu.state[key] / 2
                dev.state[key] = cuda.to_device(_host(dev.state[key]) / 2)
        for opt in (cpu, dev):
            for group, still in zip(opt.param_groups, frozen):
                group["frozen"] = still
        step_both(cpu, dev, on_cpu, on_dev, grads[t:t + 1])
        assert_same(on_dev.copy_to_host(), on_cpu)
        sc, sd = cpu.state_dict(), dev.state_dict()
        assert sorted(sc["state"]) == sorted(sd["state"]) and sc["group_state"] == sd["group_state"]
        for key in sc["state"]:
            assert_same(sd["state"][key], sc["state"][key])


def _host(buffer):
    """A state buffer's values: a device array (Numba's, or CuPy's where CuPy is installed), or a host
    one a checkpoint left there (placed on the device at the next step that updates something)."""
    if isinstance(buffer, np.ndarray):
        return buffer
    return buffer.copy_to_host() if hasattr(buffer, "copy_to_host") else buffer.get()
