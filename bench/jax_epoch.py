"""NumPyro's side of ``end_to_end.py``: one MNIST epoch and a log-likelihood
estimate, in one process, as a NumPyro user would write them at their fastest.

Reads the MNIST IDX files (``--data-dir``, the layout torchvision writes: the
``MNIST/raw`` folder), trains the paper's one-layer IWAE (the programs of
``jax_peer.py``: ``RenyiELBO(alpha=0, num_particles=k)``, Adam with eps 1e-4 and
learning rate 1e-3) for one epoch of mini-batches of ``--batch-size`` points,
each batch binarized afresh (a pixel is 1 with its intensity as probability, as
``fit`` does), all steps of the epoch one jitted ``lax.scan`` over
``SVI.update`` (NumPyro's ``svi.run`` takes one batch; this is its epoch form),
then estimates log p(x) of the first ``--eval-limit`` test images with
``--eval-k`` particles (``jax_peer.jax_log_likelihood``: a jitted scan over
chunks). Writes one JSON object (to ``--out``, else stdout): the seconds of each
phase (compile included, as the first call of a jitted function pays it) and the
mean estimate. ``--phase train`` or ``eval`` runs one of the two (the estimate
then uses the initial weights: the same work, another number).

``--cache DIR`` turns on JAX's persistent compilation cache in DIR (a second
process with the same DIR starts warm). Runs in the peer's environment::

    /work/venv-jax/bin/python bench/jax_epoch.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import numpyro  # noqa: E402
from jax import lax, random  # noqa: E402
from jax_peer import (  # noqa: E402
    ADAM_EPS,
    DECODER,
    ENCODER,
    LR,
    jax_log_likelihood,
    make_numpyro_programs,
)
from numpyro.infer import SVI, RenyiELBO  # noqa: E402

#: The layers' sizes (in, out), as ``jax_peer`` names them.
SHAPES = {
    "enc0": (784, 200),
    "enc1": (200, 200),
    "enc2": (200, 100),
    "dec0": (50, 200),
    "dec1": (200, 200),
    "dec2": (200, 784),
}


def read_idx(path: Path) -> np.ndarray:
    """An IDX file of unsigned bytes (MNIST's images) as ``[n, rows * cols]``."""
    raw = path.read_bytes()
    dims = raw[3]
    shape = np.frombuffer(raw, dtype=">u4", count=dims, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    return data.reshape(int(shape[0]), -1)


def initial_params(key) -> dict:
    """Uniform(-1/sqrt(in), 1/sqrt(in)) weights and biases, as torch's Linear."""
    params = {}
    for layer, (fan_in, fan_out) in SHAPES.items():
        key, kw, kb = random.split(key, 3)
        bound = 1 / np.sqrt(fan_in)
        params[f"{layer}_w"] = random.uniform(
            kw, (fan_in, fan_out), minval=-bound, maxval=bound
        )
        params[f"{layer}_b"] = random.uniform(
            kb, (fan_out,), minval=-bound, maxval=bound
        )
    return params


def train_epoch(args, init, train, svi_key, order_key, times, reply) -> dict:
    """One epoch of SVI from ``init``; returns the trained weights."""
    steps = len(train) // args.batch_size
    model, guide = make_numpyro_programs(init)
    optim = numpyro.optim.Adam(step_size=LR, b1=0.9, b2=0.999, eps=ADAM_EPS)
    svi = SVI(model, guide, optim, RenyiELBO(alpha=0, num_particles=args.particles))
    start = time.perf_counter()
    state = jax.block_until_ready(svi.init(svi_key, train[: args.batch_size]))
    times["init_s"] = time.perf_counter() - start

    @jax.jit
    def epoch(state, images, key):
        order_key, binarize_key = random.split(key)
        shuffled = random.permutation(order_key, images)
        batches = shuffled.reshape(steps, args.batch_size, -1)
        keys = random.split(binarize_key, steps)

        def step(state, batch_and_key):
            batch, key = batch_and_key
            x = (random.uniform(key, batch.shape) < batch).astype(batch.dtype)
            return svi.update(state, x)

        return lax.scan(step, state, (batches, keys))

    start = time.perf_counter()
    state, losses = jax.block_until_ready(epoch(state, train, order_key))
    times["epoch_s"] = time.perf_counter() - start
    reply["train_images"] = steps * args.batch_size
    reply["mean_loss_per_point"] = float(losses.mean()) / args.batch_size
    params = svi.get_params(state)
    return {name: params[name] for name in ENCODER + DECODER}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--particles", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--train-limit", type=int, default=0, help="0: all")
    parser.add_argument("--eval-k", type=int, default=5000)
    parser.add_argument("--eval-limit", type=int, default=0, help="0: all")
    parser.add_argument(
        "--eval-chunk",
        type=int,
        default=0,
        help="particles per chunk (0: about 2^17 particle-points per chunk)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cache", default=None)
    parser.add_argument("--phase", choices=["train", "eval", "both"], default="both")
    parser.add_argument("--out", default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    if args.cache:
        jax.config.update("jax_compilation_cache_dir", args.cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    times = {"import_s": time.perf_counter() - T0}

    start = time.perf_counter()
    raw = Path(args.data_dir) / "MNIST" / "raw"
    train = read_idx(raw / "train-images-idx3-ubyte").astype(np.float32) / 255
    test = read_idx(raw / "t10k-images-idx3-ubyte").astype(np.float32) / 255
    if args.train_limit:
        train = train[: args.train_limit]
    if args.eval_limit:
        test = test[: args.eval_limit]
    steps = len(train) // args.batch_size
    train = jnp.asarray(train[: steps * args.batch_size])
    test = jnp.asarray(test)
    times["data_s"] = time.perf_counter() - start

    key = random.PRNGKey(args.seed)
    key, init_key, svi_key, order_key = random.split(key, 4)
    params = initial_params(init_key)
    reply: dict = {}
    if args.phase != "eval":
        params = train_epoch(args, params, train, svi_key, order_key, times, reply)
    if args.phase != "train":
        chunk = args.eval_chunk or max(1, min(args.eval_k, 2**17 // len(test)))
        binarized = (random.uniform(key, test.shape) < test).astype(test.dtype)
        start = time.perf_counter()
        estimates = jax.block_until_ready(
            jax_log_likelihood(params, binarized, key, args.eval_k, chunk)
        )
        times["eval_s"] = time.perf_counter() - start
        reply["test_images"] = int(test.shape[0])
        reply["mean_log_likelihood"] = float(np.asarray(estimates).mean())
    times["total_s"] = time.perf_counter() - T0
    reply.update(times, jax=jax.__version__, numpyro=numpyro.__version__)
    text = json.dumps(reply) + "\n"
    if args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
