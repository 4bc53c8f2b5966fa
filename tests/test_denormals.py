"""Tests of pyro_iwae.runs.denormals: the flush mode is on inside the block, off again
after it, and a subnormal result becomes exactly zero only inside; set before
torch's thread pool starts, it reaches the pool's threads."""

import subprocess
import sys

import pytest
import torch

from pyro_iwae.runs.denormals import flush_denormals, flushing_denormals


def test_flush_denormals_turns_the_mode_on_and_restores_it():
    assert not flushing_denormals()
    x = torch.tensor([1e-20], dtype=torch.float32)
    # 1e-20 squared is 1e-40: subnormal in float32, kept unless flushed.
    assert (x * x).item() > 0.0
    with flush_denormals():
        if torch.set_flush_denormal(True):  # a CPU with the mode
            assert flushing_denormals()
            assert (x * x).item() == 0.0
    assert not flushing_denormals()
    assert (x * x).item() > 0.0


def test_flush_denormals_keeps_a_mode_set_before():
    if not torch.set_flush_denormal(True):
        return  # no such mode on this CPU
    try:
        with flush_denormals():
            pass
        assert flushing_denormals()
        with flush_denormals(enabled=False):
            assert flushing_denormals()
    finally:
        torch.set_flush_denormal(False)
    assert not flushing_denormals()


def test_flushing_from_the_start_reaches_torchs_worker_threads():
    """Set before torch's thread pool starts, the mode reaches the threads its
    matrix products run on; set after, only the calling thread's (the check can
    fail)."""
    if torch.get_num_threads() < 2 or not torch.set_flush_denormal(False):
        pytest.skip("needs two threads and a CPU with the flush mode")
    script = """
import sys
import torch
from pyro_iwae.runs.denormals import (
    flush_denormals_from_start, flushing_denormals_everywhere,
)
torch.set_num_threads(2)
if sys.argv[1] == "late":
    a = torch.randn(1000, 1000)
    (a @ a).sum()  # the pool starts
    print(flush_denormals_from_start(), flushing_denormals_everywhere())
else:
    print(flush_denormals_from_start(), flushing_denormals_everywhere())
"""
    outputs = {
        when: subprocess.run(
            [sys.executable, "-c", script, when], capture_output=True, text=True
        ).stdout.split()
        for when in ("early", "late")
    }
    assert outputs["early"] == ["True", "True"], outputs
    assert outputs["late"] == ["False", "False"], outputs
