"""The CPU's GEMM options for the paper model's shapes (issue 26): which way of
multiplying is fastest here, for each product a training step or an estimate
makes.

For the one-layer model (q 784-200-200-100, p 50-200-200-784) at a batch of
``B`` points and ``k`` particles, the rows are ``M = B`` for the encoder and
``M = B * k`` for the decoder; each layer's forward product is ``[M, in] @
[in, out]``, its backward the products for the input's gradient (``[M, out] @
[out, in]``) and the weight's (``[out, M] @ [M, in]``). For each, in float32:

- ``mkl``: ``torch.nn.functional.linear`` (torch's default CPU GEMM, MKL);
- ``onednn``: oneDNN's linear (``torch.ops.mkldnn._linear_pointwise``, what
  inductor's weight prepacking calls), weight as given;
- ``onednn-packed``: the same with the weight reordered once for oneDNN
  (``torch.ops.mkldnn._reorder_linear_weight``: inference-style prepacking);
- ``xla``: ``jax.numpy.dot`` under ``jax.jit`` in the peer's environment, with
  ``--jax-python`` (the GEMM that NumPyro's steps run on).

Each cell is the median of ``--repeats`` timed calls (after warm-up), as GFLOP/s.
Load is recorded before and after; rerun when it was above 0.5 per core. Run::

    python bench/gemm_options.py --jax-python /work/venv-jax/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from common import environment, environment_markdown, markdown_table, timed

#: (layer, in, out, rows): rows "B" for the encoder, "Bk" for the decoder.
LAYERS = [
    ("enc0", 784, 200, "B"),
    ("enc1", 200, 200, "B"),
    ("enc2", 200, 100, "B"),
    ("dec0", 50, 200, "Bk"),
    ("dec1", 200, 200, "Bk"),
    ("dec2", 200, 784, "Bk"),
]

_JAX_WORKER = """
import json, sys, time, statistics
import jax, jax.numpy as jnp
dot = jax.jit(jnp.dot)
out = []
for m, k, n, repeats in json.loads(sys.argv[1]):
    a = jax.random.normal(jax.random.PRNGKey(0), (m, k))
    b = jax.random.normal(jax.random.PRNGKey(1), (k, n))
    for _ in range(5):
        dot(a, b).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        dot(a, b).block_until_ready()
        times.append(time.perf_counter() - start)
    out.append(2 * m * k * n / statistics.median(times) / 1e9)
print(json.dumps(out))
"""


def products(batch: int, k: int) -> list[tuple[str, int, int, int]]:
    """(name, M, K, N) of each ``[M, K] @ [K, N]`` product of a training step."""
    rows = {"B": batch, "Bk": batch * k}
    out = []
    for layer, fan_in, fan_out, kind in LAYERS:
        m = rows[kind]
        out.append((f"{layer} forward", m, fan_in, fan_out))
        out.append((f"{layer} d input", m, fan_out, fan_in))
        out.append((f"{layer} d weight", fan_out, m, fan_in))
    return out


def gflops(fn, flops: int, repeats: int) -> float:
    for _ in range(5):
        fn()
    return flops / statistics.median(timed(fn) for _ in range(repeats)) / 1e9


def torch_options(m: int, k: int, n: int, repeats: int) -> dict[str, float]:
    """GFLOP/s of ``[m, k] @ [k, n]`` by each torch option."""
    a = torch.randn(m, k)
    weight = torch.randn(n, k)  # as nn.Linear holds it: [out, in]
    flops = 2 * m * k * n
    result = {
        "mkl": gflops(lambda: torch.nn.functional.linear(a, weight), flops, repeats)
    }
    linear = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if linear is not None and torch.backends.mkldnn.is_available():
        result["onednn"] = gflops(
            lambda: linear(a, weight, None, "none", [], ""), flops, repeats
        )
        reorder = getattr(torch.ops.mkldnn, "_reorder_linear_weight", None)
        if reorder is not None:
            packed = reorder(weight, m)
            result["onednn-packed"] = gflops(
                lambda: linear(a, packed, None, "none", [], ""), flops, repeats
            )
    return result


def xla_options(jax_python: str, shapes: list[tuple[int, int, int]], repeats: int):
    request = json.dumps([[m, k, n, repeats] for m, k, n in shapes])
    done = subprocess.run(
        [jax_python, "-c", _JAX_WORKER, request],
        capture_output=True,
        text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )
    if done.returncode:
        raise SystemExit(f"the JAX worker failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--cells", nargs="+", default=["20x5", "100x5", "20x50", "100x50"]
    )
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--jax-python", default=None)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    env = environment()
    # The first product of a process starts MKL's and oneDNN's thread pools.
    torch_options(64, 64, 64, 3)
    load_before = os.getloadavg()[0]
    rows, records = [], []
    start = time.time()
    for cell in args.cells:
        batch, k = (int(v) for v in cell.split("x"))
        prods = products(batch, k)
        xla = (
            xla_options(args.jax_python, [p[1:] for p in prods], args.repeats)
            if args.jax_python
            else [None] * len(prods)
        )
        for (name, m, kk, n), xla_gflops in zip(prods, xla, strict=True):
            options = torch_options(m, kk, n, args.repeats)
            if xla_gflops is not None:
                options["xla"] = xla_gflops
            best = max(options, key=options.get)
            records.append(
                {"cell": cell, "product": name, "m": m, "k": kk, "n": n, **options}
            )
            rows.append(
                [
                    f"b{batch} k{k}",
                    name,
                    f"{m}x{kk}x{n}",
                    *(
                        f"{options[o]:.0f}" if o in options else "-"
                        for o in ("mkl", "onednn", "onednn-packed", "xla")
                    ),
                    best,
                ]
            )
    load_after = os.getloadavg()[0]
    table = markdown_table(
        [
            "cell",
            "product",
            "M x K x N",
            "mkl GF/s",
            "onednn GF/s",
            "onednn packed GF/s",
            "xla GF/s",
            "fastest",
        ],
        rows,
    )
    print(
        "\n".join(
            [
                "## GEMM options for the paper model's products",
                "",
                environment_markdown(env),
                f"- load average (1 min) before / after: {load_before:.2f} / "
                f"{load_after:.2f}; {time.time() - start:.0f} s",
                "",
                table,
            ]
        )
    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"environment": env, "results": records}, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
