"""Shared helpers of the benchmarks: machine facts, statistics, tables, JSON."""

from __future__ import annotations

import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform.processor``)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def cpu_isa() -> str:
    """The widest vector ISA among the CPU's flags (``/proc/cpuinfo``) and the
    one torch's kernels dispatch to, as ``"AVX-512 (torch: AVX512)"``."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    names = [("avx512f", "AVX-512"), ("avx2", "AVX2"), ("avx", "AVX")]
    widest = next((name for flag, name in names if flag in flags), "unknown")
    extras = sorted(f for f in flags if f.startswith(("amx", "avx512_bf16")))
    torch_isa = torch.backends.cpu.get_cpu_capability()
    return f"{widest}{' + ' + ', '.join(extras) if extras else ''} (torch: {torch_isa})"


class CpuMeter:
    """CPU seconds the whole machine was busy (``/proc/stat``, steal included:
    a VM's neighbours) against those of our own processes, so that a timing can
    say how much *other* work ran beside it.

    ``mark()`` returns a reading; ``outside_cores(a, b, own_cpu_s)`` is the
    mean number of cores that other processes kept busy between two readings,
    given the CPU seconds our processes used meanwhile.
    """

    TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def machine_busy_s() -> float:
        try:
            with open("/proc/stat") as f:
                fields = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return float("nan")
        # user nice system idle iowait irq softirq steal (guest is in user).
        busy = sum(fields[:3]) + sum(fields[5:8])
        return busy / CpuMeter.TICK

    def mark(self) -> tuple[float, float]:
        return time.perf_counter(), self.machine_busy_s()

    @staticmethod
    def outside_cores(
        a: tuple[float, float], b: tuple[float, float], own_cpu_s: float
    ) -> float:
        wall = b[0] - a[0]
        return max(0.0, (b[1] - a[1] - own_cpu_s) / wall) if wall > 0 else 0.0


def _git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout.strip()


def git_revision() -> str:
    """The repository's commit, with ``+dirty`` if the work tree has changes."""
    try:
        rev = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


def environment(seed: int | None = None, **extra: Any) -> dict[str, Any]:
    """Machine, versions, date and command line of this run."""
    import pyro

    import pyro_iwae

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"
        ),
        "command": shlex.join(["python", *sys.argv]),
        "seed": seed,
        "cpu": cpu_model(),
        "isa": cpu_isa(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pyro": pyro.__version__,
        "pyro_iwae": pyro_iwae.__version__,
        "git": git_revision(),
        **({"isa_caps": caps} if (caps := isa_caps()) else {}),
        # Every report names the GEMM speed it ran at (issue 26): the ratios to
        # JAX differ between hosts as their matrix products do.
        "torch_gemm_peak_gflops": round(matmul_peak(repeats=5)["peak_gflops"], 1),
        **extra,
    }


#: Environment variables that hold a process below the CPU's widest ISA: torch's
#: ATen kernels and inductor's C++ kernels, MKL, oneDNN, XLA's code generation.
ISA_CAP_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "MKL_ENABLE_INSTRUCTIONS",
    "ONEDNN_MAX_CPU_ISA",
    "XLA_FLAGS",
)


def isa_caps() -> str:
    """The ISA caps set in this environment, as ``NAME=value`` words, or ''."""
    return " ".join(
        f"{name}={os.environ[name]}"
        for name in ISA_CAP_VARIABLES
        if os.environ.get(name)
    )


def environment_markdown(env: dict[str, Any]) -> str:
    """The environment as a Markdown bullet list."""
    lines = [
        f"- date: {env['date']}",
        f"- command: `{env['command']}`",
        f"- seed: {env['seed']}",
        f"- CPU: {env['cpu']}, {env['logical_cpus']} logical CPUs "
        f"({env['usable_cpus']} usable); torch threads {env['torch_threads']} "
        f"(inter-op {env['torch_interop_threads']})",
        f"- ISA: {env.get('isa', 'not recorded')}",
        "- torch GEMM peak: "
        + (
            f"{env['torch_gemm_peak_gflops']} GFLOP/s (2048 x 2048 float32 "
            "`torch.mm`, best of 5, this process's threads)"
            if "torch_gemm_peak_gflops" in env
            else "not recorded"
        ),
        "- load average at start: "
        + ", ".join(f"{x:.2f}" for x in env["load_average"]),
        f"- versions: Python {env['python']}, torch {env['torch']}, "
        f"pyro-ppl {env['pyro']}, pyro-iwae {env['pyro_iwae']} (git {env['git']})",
    ]
    lines += [
        f"- {key.replace('_', ' ')}: {value}"
        for key, value in env.items()
        if key not in _STANDARD_KEYS
    ]
    return "\n".join(lines)


_STANDARD_KEYS = {
    "torch_gemm_peak_gflops",
    "date",
    "command",
    "seed",
    "cpu",
    "isa",
    "logical_cpus",
    "usable_cpus",
    "torch_threads",
    "torch_interop_threads",
    "load_average",
    "python",
    "torch",
    "pyro",
    "pyro_iwae",
    "git",
}


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table; numeric columns right-aligned."""
    numeric = [
        bool(rows) and all(_is_number(row[i]) for row in rows)
        for i in range(len(headers))
    ]
    lines = [
        "| " + " | ".join(headers) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _is_number(cell: Any) -> bool:
    if isinstance(cell, int | float) or cell == "":
        return True
    try:
        float(str(cell).rstrip("%").replace(",", ""))
    except ValueError:
        return False
    return True


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile."""
    if len(values) < 2:
        return values[0], values[0], values[0]
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def write_json(path: str | os.PathLike, payload: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
        f.write("\n")


def matmul_peak(
    size: int = 2048, repeats: int = 10, device: str = "cpu"
) -> dict[str, float]:
    """GFLOP/s of ``torch.mm`` on ``size`` x ``size`` float32 matrices on ``device``.

    The best of ``repeats`` timed products (after one warm-up) is the peak; the
    median is reported too, as a measure of the noise on a shared machine.
    """
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    out = torch.empty(size, size, device=device)
    torch.mm(a, b, out=out)
    times = [timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats)]
    flops = 2 * size**3
    return {
        "size": size,
        "peak_gflops": flops / min(times) / 1e9,
        "median_gflops": flops / statistics.median(times) / 1e9,
    }


def timed(fn: Callable[[], Any]) -> float:
    """Seconds one call of ``fn`` takes, its GPU work included."""
    # CUDA kernels run asynchronously: wait for them at both ends.
    cuda = torch.cuda.is_initialized()
    if cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - start


# Runs argv[2:] and writes its resource usage to the file argv[1]. A direct child
# of a large process inherits that process's peak RSS into its own ru_maxrss (Linux
# keeps the high-water mark across fork and exec), so the command runs as the
# child of this small interpreter, as under /usr/bin/time.
_MEASURE = """
import json, resource, subprocess, sys, time
start = time.perf_counter()
code = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - start
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
with open(sys.argv[1], "w") as f:
    json.dump({"returncode": code, "wall_s": wall,
               "peak_rss_mib": usage.ru_maxrss / 1024,
               "cpu_s": usage.ru_utime + usage.ru_stime,
               "minor_faults": usage.ru_minflt}, f)
"""


def run_measured(command: Sequence[str], **kwargs: Any) -> dict[str, Any]:
    """Runs ``command``; returns its exit code, wall and CPU seconds, peak RSS (MiB)
    and minor page faults. ``kwargs`` go to :func:`subprocess.run`.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "usage.json"
        subprocess.run([sys.executable, "-c", _MEASURE, str(path), *command], **kwargs)
        return json.loads(path.read_text())


def load_test_images(dataset: str, data_dir: str | None, n: int) -> torch.Tensor:
    """The first ``n`` binarised test images (``[n, 784]`` of 0/1), fixed seed."""
    from pyro_iwae.data import load_dataset

    return load_dataset(dataset, data_dir, download=False).test[:n].contiguous()


def add_common_arguments(parser) -> None:
    """Options every benchmark takes: data, seed, validation, JSON output."""
    parser.add_argument(
        "--dataset",
        default="mnist",
        help="data set of the test images: mnist (needs --data-dir) or mnist-mini "
        "(embedded, for smoke runs)",
    )
    parser.add_argument(
        "--data-dir",
        default=None,
        help="folder holding MNIST/raw (default: pyro_iwae.data.default_data_dir())",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--validation",
        action="store_true",
        help="keep Pyro's validation on (default: off, the steady-state setting)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write results as JSON")
