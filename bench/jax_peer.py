"""The JAX / NumPyro peer of the benchmarks: a worker driven by ``versus_jax.py``.

Runs in its own environment (``jax`` and ``numpyro``, never dependencies of
pyro-iwae; see bench/README.md), started by ``versus_jax.py`` as a subprocess. It
reads one JSON command per line on stdin and answers one JSON line on stdout:

- ``{"cmd": "hello"}``: versions and devices.
- ``{"cmd": "load", "path": NPZ}``: the initial weights (``enc0_w`` ... ``dec2_b``,
  weights as ``[in, out]``) and the images ``x`` (``[n, 784]`` of 0/1), written by
  the driver from pyro-iwae's networks, so both sides start from the same weights.
- ``{"cmd": "train", "batch": B, "k": K}``: builds, jits and warms up the training
  steps on the first B images: ``numpyro-run`` (NumPyro's own fastest path,
  ``SVI.run`` without a progress bar: a ``lax.scan`` of ``RUN_STEPS`` SVI steps,
  under ``jax.jit``, each call continuing from the last state), ``numpyro-update``
  (``SVI`` with ``RenyiELBO(alpha=0, num_particles=K)`` and ``numpyro.optim.Adam``,
  its ``update`` under ``jax.jit``, one call a step) and ``jax-hand`` (a
  hand-written IWAE loss, ``jax.value_and_grad`` and Adam in one jitted
  function, parameters donated).
- ``{"cmd": "time", "variant": V, "steps": n}``: runs n steps of V (for
  ``numpyro-run``, ``max(1, n // RUN_STEPS)`` calls of ``RUN_STEPS`` steps), each
  call waited for (``block_until_ready``); answers the seconds per step of each
  call and the process's CPU seconds over all of them.
- ``{"cmd": "check", "path": NPZ, "out": NPZ2}``: the hand-written loss (answered)
  and gradients (written to NPZ2) at the initial weights and the noise ``eps``
  ([K, B, 50]) of NPZ, for the driver to compare with PyTorch's from the same
  noise; and ``draws`` NumPyro losses (its own noise).
- ``{"cmd": "ll", "images": N, "num_samples": K, "chunk": C}``: jits the
  ``jax-ll`` estimate of log p(x) of the first N images, K particles in chunks of C
  (``lax.scan`` with a running logsumexp).
- ``{"cmd": "matmul", "size": S, "repeats": R}``: GFLOP/s of a jitted ``a @ b`` of
  S x S float32 matrices, the best (peak) and median of R timed calls: JAX's side
  of the GEMM peaks the report gives.
- ``{"cmd": "quit"}``.

The architecture is the paper's one-layer IWAE as pyro-iwae builds it: q 784-200-
200-100 (mean and log standard deviation of 50 latents), p 50-200-200-784 Bernoulli
logits, tanh hidden units, Adam with eps 1e-4 and learning rate 1e-3. The
hand-written programs score the pixels with NumPyro's own Bernoulli log-density
(``dist.Bernoulli(logits=...).log_prob``), the formulation NumPyro's users get.
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import statistics
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax import lax, random
from numpyro.infer import SVI, RenyiELBO

LR = 1e-3
#: SVI steps per call of ``numpyro-run`` (one jitted ``lax.scan``).
RUN_STEPS = 10
ADAM_EPS = 1e-4
Z_DIM = 50
HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)
ENCODER = [f"enc{i}_{p}" for i in range(3) for p in ("w", "b")]
DECODER = [f"dec{i}_{p}" for i in range(3) for p in ("w", "b")]


def mlp(params, prefix, h):
    """Three linear layers, tanh after the first two."""
    for i in range(3):
        h = h @ params[f"{prefix}{i}_w"] + params[f"{prefix}{i}_b"]
        if i < 2:
            h = jnp.tanh(h)
    return h


def encode(params, x):
    out = mlp(params, "enc", x)
    return out[..., :Z_DIM], out[..., Z_DIM:]


# -- NumPyro -----------------------------------------------------------------------


def make_numpyro_programs(init):
    def model(x):
        p = {name: numpyro.param(name, init[name]) for name in DECODER}
        with numpyro.plate("data", x.shape[0]):
            z = numpyro.sample("z", dist.Normal(jnp.zeros(Z_DIM), 1.0).to_event(1))
            logits = mlp(p, "dec", z)
            numpyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(x):
        p = {name: numpyro.param(name, init[name]) for name in ENCODER}
        with numpyro.plate("data", x.shape[0]):
            loc, log_scale = encode(p, x)
            numpyro.sample("z", dist.Normal(loc, jnp.exp(log_scale)).to_event(1))

    return model, guide


# -- hand-written JAX ----------------------------------------------------------------


def log_weights(params, x, eps, loc=None, log_scale=None):
    """``[k, batch]`` log p(x, z) - log q(z|x) at ``z = loc + scale * eps``."""
    if loc is None:
        loc, log_scale = encode(params, x)
    scale = jnp.exp(log_scale)
    z = loc + scale * eps
    log_q = (-0.5 * ((z - loc) / scale) ** 2 - log_scale - HALF_LOG_2PI).sum(-1)
    log_pz = (-0.5 * z**2 - HALF_LOG_2PI).sum(-1)
    logits = mlp(params, "dec", z)
    log_px = dist.Bernoulli(logits=logits).log_prob(x).sum(-1)
    return log_px + log_pz - log_q


def hand_loss(params, x, eps):
    """``-mean_b L_k(x_b)``, as bench/handwritten.py's ``HandIWAE.loss``."""
    k = eps.shape[0]
    log_w = log_weights(params, x, eps)
    return -(jax.scipy.special.logsumexp(log_w, axis=0) - math.log(k)).mean()


def adam_init(params):
    return {
        "m": jax.tree.map(jnp.zeros_like, params),
        "v": jax.tree.map(jnp.zeros_like, params),
        "t": jnp.zeros((), jnp.int32),
    }


def adam_update(params, grads, state, b1=0.9, b2=0.999):
    t = state["t"] + 1
    m = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state["m"], grads)
    v = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state["v"], grads)
    c1 = 1 - b1**t
    c2 = 1 - b2**t
    params = jax.tree.map(
        lambda p, m, v: p - LR * (m / c1) / (jnp.sqrt(v / c2) + ADAM_EPS),
        params,
        m,
        v,
    )
    return params, {"m": m, "v": v, "t": t}


def make_hand_step(k):
    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, x, key):
        key, sub = random.split(key)
        loc_shape = (k, x.shape[0], Z_DIM)
        eps = random.normal(sub, loc_shape)
        loss, grads = jax.value_and_grad(hand_loss)(params, x, eps)
        params, opt_state = adam_update(params, grads, opt_state)
        return params, opt_state, key, loss

    return step


@partial(jax.jit, static_argnames=("num_samples", "chunk"))
def jax_log_likelihood(params, x, key, num_samples, chunk):
    """``[n]`` estimates of log p(x): ``num_samples`` particles in chunks."""
    loc, log_scale = encode(params, x)
    chunks, rest = divmod(num_samples, chunk)

    def lse(eps):
        return jax.scipy.special.logsumexp(
            log_weights(params, x, eps, loc, log_scale), axis=0
        )

    def body(total, key):
        eps = random.normal(key, (chunk,) + loc.shape)
        return jnp.logaddexp(total, lse(eps)), None

    keys = random.split(key, chunks + 1)
    total = jnp.full(x.shape[0], -jnp.inf)
    total, _ = lax.scan(body, total, keys[:chunks])
    if rest:
        total = jnp.logaddexp(total, lse(random.normal(keys[-1], (rest,) + loc.shape)))
    return total - math.log(num_samples)


# -- the worker ----------------------------------------------------------------------


class Worker:
    def __init__(self):
        self.init = None
        self.images = None
        self.steps = {}
        self.steps_per_call: dict[str, int] = {}

    def hello(self, _):
        return {
            "jax": jax.__version__,
            "jaxlib": importlib.metadata.version("jaxlib"),
            "numpyro": numpyro.__version__,
            "python": sys.version.split()[0],
            "devices": [str(d) for d in jax.devices()],
        }

    def load(self, cmd):
        data = np.load(cmd["path"])
        self.init = {name: jnp.asarray(data[name]) for name in ENCODER + DECODER}
        self.images = jnp.asarray(data["x"])
        return {"images": int(self.images.shape[0])}

    def train(self, cmd):
        batch, k = cmd["batch"], cmd["k"]
        x = self.images[:batch]
        warmup = cmd.get("warmup", 3)
        start = time.perf_counter()
        model, guide = make_numpyro_programs(self.init)
        optim = numpyro.optim.Adam(step_size=LR, b1=0.9, b2=0.999, eps=ADAM_EPS)
        svi = SVI(model, guide, optim, RenyiELBO(alpha=0, num_particles=k))
        svi_state = svi.init(random.PRNGKey(cmd.get("seed", 0)), x)
        update = jax.jit(svi.update)
        state = {"svi": svi_state, "run": svi_state}

        def svi_step():
            state["svi"], loss = update(state["svi"], x)
            jax.block_until_ready((state["svi"], loss))

        # SVI.run as its users call it (no progress bar: one lax.scan), jitted
        # once so that every call of RUN_STEPS steps reuses the compiled scan.
        @jax.jit
        def run(svi_state):
            result = svi.run(
                random.PRNGKey(0),
                RUN_STEPS,
                x,
                progress_bar=False,
                init_state=svi_state,
            )
            return result.state, result.losses

        def run_steps():
            state["run"], losses = run(state["run"])
            jax.block_until_ready((state["run"], losses))

        hand = make_hand_step(k)
        params = jax.tree.map(jnp.array, self.init)  # copies: they are donated
        state["hand"] = (params, adam_init(params), random.PRNGKey(cmd.get("seed", 0)))

        def hand_step():
            p, o, key = state["hand"]
            p, o, key, loss = hand(p, o, x, key)
            state["hand"] = (p, o, key)
            jax.block_until_ready((p, loss))

        self.steps = {
            "numpyro-run": run_steps,
            "numpyro-update": svi_step,
            "jax-hand": hand_step,
        }
        self.steps_per_call = {"numpyro-run": RUN_STEPS}
        for step in self.steps.values():
            for _ in range(warmup):
                step()
        return {"compile_and_warmup_s": time.perf_counter() - start}

    def ll(self, cmd):
        n, num_samples, chunk = cmd["images"], cmd["num_samples"], cmd["chunk"]
        x = self.images[:n]
        keys = {"key": random.PRNGKey(cmd.get("seed", 0))}
        start = time.perf_counter()

        def estimate():
            keys["key"], sub = random.split(keys["key"])
            out = jax_log_likelihood(self.init, x, sub, num_samples, chunk)
            return np.asarray(jax.block_until_ready(out))

        first = estimate()
        self.steps = {"jax-ll": estimate}
        self.steps_per_call = {}
        return {
            "compile_and_first_s": time.perf_counter() - start,
            "estimates": first.tolist(),
        }

    def matmul(self, cmd):
        size, repeats = cmd.get("size", 2048), cmd.get("repeats", 10)
        keys = random.split(random.PRNGKey(0))
        a, b = (random.normal(key, (size, size), jnp.float32) for key in keys)
        product = jax.jit(jnp.matmul)
        jax.block_until_ready(product(a, b))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(product(a, b))
            times.append(time.perf_counter() - start)
        flops = 2 * size**3
        return {
            "size": size,
            "peak_gflops": flops / min(times) / 1e9,
            "median_gflops": flops / statistics.median(times) / 1e9,
        }

    def time(self, cmd):
        variant = cmd["variant"]
        step = self.steps[variant]
        per_call = self.steps_per_call.get(variant, 1)
        times = []
        cpu = time.process_time()
        for _ in range(max(1, cmd.get("steps", 1) // per_call)):
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) / per_call)
        cpu = time.process_time() - cpu
        return {"times_s": times, "cpu_s": cpu, "steps": per_call * len(times)}

    def check(self, cmd):
        data = np.load(cmd["path"])
        x = self.images[: data["eps"].shape[1]]
        eps = jnp.asarray(data["eps"])
        loss, grads = jax.value_and_grad(hand_loss)(self.init, x, eps)
        model, guide = make_numpyro_programs(self.init)
        elbo = RenyiELBO(alpha=0, num_particles=int(eps.shape[0]))
        params = dict(self.init)
        losses = [
            float(elbo.loss(random.PRNGKey(i), params, model, guide, x))
            for i in range(cmd.get("draws", 20))
        ]
        np.savez(cmd["out"], **{name: np.asarray(g) for name, g in grads.items()})
        return {"loss": float(loss), "numpyro_losses": losses}


def main():
    worker = Worker()
    out = sys.stdout
    # Anything else printed (JAX's warnings) goes to stderr, off the protocol.
    sys.stdout = sys.stderr
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["cmd"] == "quit":
            break
        try:
            reply = getattr(worker, cmd["cmd"])(cmd)
        except Exception as error:  # reported to the driver, which raises
            reply = {"error": f"{type(error).__name__}: {error}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
