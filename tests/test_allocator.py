"""Tests of pyro_iwae.runs.allocator: after keep_freed_memory a training step
reuses the memory the last one freed (next to no page faults), where by glibc's
defaults it faults thousands of pages in afresh; a user's own malloc settings are left
alone. Each case runs in a fresh interpreter: the thresholds are the process's."""

import os
import subprocess
import sys

import pytest

from pyro_iwae.runs import allocator

glibc = (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc")

# Training steps of the paper's model at batch 100, k = 50: by glibc's defaults
# most of them fault about 10,000 pages in afresh.
_SCRIPT = """
import resource, sys
import torch
from pyro_iwae import IWELBO, paper_architecture
from pyro_iwae.runs.allocator import keep_freed_memory
kept = keep_freed_memory() if sys.argv[1] == "keep" else None
torch.manual_seed(0)
model, guide = paper_architecture(1)
x = (torch.rand(100, 784) < 0.5).float()
elbo = IWELBO(num_particles=50)
faults = []
for _ in range(14):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    elbo.differentiable_loss(model, guide, x).backward()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(kept, sum(faults[2:]))
"""


def _faults(how: str, **env: str) -> tuple[str, int]:
    """(what keep_freed_memory answered, the page faults of the twelve steps
    after the first two)."""
    out = subprocess.run(
        [sys.executable, "-c", _SCRIPT, how],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, **env},
    ).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not glibc, reason="glibc's malloc only")
def test_kept_memory_is_reused_without_page_faults():
    # By default about 130,000; kept, 8,000 at most in the runs seen (now and
    # then a step finds no free block of the size it needs and grows the heap).
    kept, faults = _faults("defaults")
    assert kept == "None" and faults > 50_000
    kept, faults = _faults("keep")
    assert kept == "True" and faults < 20_000


@pytest.mark.skipif(not glibc, reason="glibc's malloc only")
def test_a_users_malloc_settings_are_left_alone():
    kept, faults = _faults("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False" and faults > 50_000
    kept, _ = _faults("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=131072")
    assert kept == "False"


def test_other_c_libraries_are_left_alone(monkeypatch):
    monkeypatch.setattr(allocator.os, "confstr", lambda name: None)
    assert allocator.keep_freed_memory() is False

    def unknown(name):
        raise ValueError(name)

    monkeypatch.setattr(allocator.os, "confstr", unknown)
    assert allocator.keep_freed_memory() is False
