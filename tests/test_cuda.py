"""The CUDA path for real: skipped without a GPU (CI has none); run on a GPU machine
by ``scripts/gpu_check.sh``, whose output is in ``results/gpu.md``."""

import contextlib
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from click.testing import CliRunner
from linear_gaussian import LinearGaussian

from pyro_iwae import (
    IWELBO,
    ais_log_likelihood,
    log_likelihood,
    log_likelihood_with_diagnostics,
    paper_architecture,
)
from pyro_iwae.compiled import CompiledLogLikelihood, CompiledLoss
from pyro_iwae.data import load_dataset
from pyro_iwae.runs.checkpoints import CHECKPOINT_FILE, load_checkpoint
from pyro_iwae.runs.config import RunConfig
from pyro_iwae_cli import progress
from pyro_iwae_cli.main import cli

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

SMALL = ["--train-limit", 200, "--test-limit", 50, "--batch-size", 50]
SMALL += ["--particles", 2, "--quiet"]


@pytest.fixture
def lg():
    """The linear-Gaussian model with its constants on the GPU."""
    model = LinearGaussian()
    for name in ("W", "b", "post_cov", "A"):
        setattr(model, name, getattr(model, name).cuda())
    # Data drawn on the CPU as elsewhere, so they are the same points.
    model.sample_data = lambda n, seed=1: LinearGaussian().sample_data(n, seed).cuda()
    return model


def invoke(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.parametrize("estimator", ["iwae", "stl", "dreg"])
def test_exact_posterior_bound_is_log_marginal_on_cuda(lg, estimator):
    x = lg.sample_data(5)
    log_w = IWELBO(10, estimator).particles(lg.model, lg.exact_guide, x).log_weights
    assert log_w.is_cuda
    assert torch.allclose(log_w, lg.log_marginal(x).expand_as(log_w))


def test_dreg_guide_gradient_is_zero_at_the_exact_posterior_on_cuda(lg):
    """An auxiliary site feeding a Delta site, as Pyro's autoguides do."""
    x = lg.sample_data(4)

    def guide(data):
        # Read through pyro.param, so that stl and dreg can hold them constant.
        loc = pyro.param("loc", lg.post_loc(x))
        tril = pyro.param("tril", torch.linalg.cholesky(lg.post_cov))
        with pyro.plate("data", data.shape[0]):
            aux = pyro.sample(
                "aux",
                dist.MultivariateNormal(loc, scale_tril=tril),
                infer={"is_auxiliary": True},
            )
            pyro.sample("z", dist.Delta(aux, event_dim=1))

    guide(x)
    params = [pyro.param("loc"), pyro.param("tril")]
    grads = {}
    for estimator in ("iwae", "dreg"):
        loss = IWELBO(20, estimator).differentiable_loss(lg.model, guide, x)
        grads[estimator] = torch.autograd.grad(loss, params)
    assert max(g.abs().max() for g in grads["iwae"]) > 1e-2
    assert max(g.abs().max() for g in grads["dreg"]) < 1e-9


def test_log_likelihood_on_cuda_is_within_standard_errors(lg):
    x = lg.sample_data(10)
    guide = lg.diagonal_guide(shift=0.3, inflate=1.5)
    estimate = log_likelihood(lg.model, guide, x, num_samples=5000, chunk_size=700)
    assert estimate.is_cuda and estimate.shape == (10,)
    log_w = IWELBO(5000).particles(lg.model, guide, x).log_weights.reshape(5000, -1)
    w = (log_w - log_w.logsumexp(0)).exp() * 5000
    se = w.std(0) / math.sqrt(5000)
    assert ((estimate - lg.log_marginal(x)).abs() < 4 * se + 1e-3).all()


def _quiet_validation():
    """Pyro's and torch's argument checks off (they read values back)."""
    validate = torch.distributions.Distribution._validate_args
    stack = contextlib.ExitStack()
    stack.enter_context(pyro.validation_enabled(False))
    torch.distributions.Distribution.set_default_validate_args(False)
    stack.callback(torch.distributions.Distribution.set_default_validate_args, validate)
    return stack


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("estimator", ["iwae", "dreg"])
def test_training_steps_do_not_synchronise_with_the_host(estimator, compiled):
    """After warm-up steps, loss, backward and Adam run without a device sync
    (with Pyro's and torch's argument validation off: its checks read values).
    Compiled: replayed as a CUDA graph (inductor skips none), with the eager loss
    and gradients from the same noise."""
    from torch._dynamo.utils import counters

    data = load_dataset("mnist-mini")
    model, guide = paper_architecture(1, data_mean=data.train_mean)
    model.cuda(), guide.cuda()
    elbo = IWELBO(5, estimator)
    loss_fn = CompiledLoss(elbo, model, guide) if compiled else elbo(model, guide)
    params = [*model.parameters(), *guide.parameters()]
    optimizer = torch.optim.Adam(params, lr=1e-3, eps=1e-4, fused=True)
    x = torch.bernoulli(data.train[:100]).cuda()
    skips = counters["inductor"]["cudagraph_skips"]

    def step():
        optimizer.zero_grad()
        loss = loss_fn(x) / x.shape[0]
        loss.backward()
        optimizer.step()
        return loss

    with _quiet_validation():
        for _ in range(3):  # compiled: trace and check, warm up, record
            step()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                loss = step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert math.isfinite(loss.item())
        assert counters["inductor"]["cudagraph_skips"] == skips
        if not compiled:
            return
        assert loss_fn.compiled
        grads = []
        for fn in (loss_fn, loss_fn.eager):
            optimizer.zero_grad()
            torch.manual_seed(3)
            loss = fn(x)
            loss.backward()
            grads.append([loss.detach(), *(p.grad.clone() for p in params)])
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())


def test_fit_eval_nll_sample_and_resume_with_cuda(tmp_path, monkeypatch):
    full, cut = tmp_path / "full", tmp_path / "cut"
    invoke("fit", *SMALL, "--epochs", 2, "--cuda", "--out", full)
    assert RunConfig.load(full).device == "cuda"

    def interrupt(self, metrics):
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(progress.FitProgress, "on_epoch_end", interrupt)
        stopped = CliRunner().invoke(
            cli,
            [str(a) for a in ("fit", *SMALL, "--epochs", 2, "--cuda", "--out", cut)],
        )
    assert stopped.exit_code == 130, stopped.output
    invoke("fit", "--resume", "--out", cut, "--cuda")
    ends = [load_checkpoint(run / CHECKPOINT_FILE) for run in (full, cut)]
    for part in ("model", "guide"):
        for key, value in ends[0][part].items():
            assert torch.equal(value, ends[1][part][key]), key

    on_gpu = invoke("eval-nll", full, "--k", 100, "--limit", 50, "--cuda")
    on_cpu = invoke("eval-nll", full, "--k", 100, "--limit", 50)
    for result in (on_gpu, on_cpu):
        assert "NLL = " in result.output and "50 points" in result.output
    invoke("sample", full, "--cuda", "--out", tmp_path / "samples.png")
    assert (tmp_path / "samples-reconstructions.png").is_file()


def test_ais_and_diagnostics_on_cuda(lg):
    x = lg.sample_data(6)
    guide = lg.diagonal_guide(shift=0.3, inflate=1.5)
    result = ais_log_likelihood(lg.model, guide, x, num_steps=50, num_chains=8)
    assert result.log_likelihood.is_cuda
    error = result.log_likelihood - lg.log_marginal(x)
    assert (error.abs() < 5 * result.stderr + 0.05).all(), (error, result.stderr)
    diagnostics = log_likelihood_with_diagnostics(lg.model, guide, x, num_samples=500)
    assert diagnostics.ess.is_cuda and (diagnostics.ess <= 500).all()


def test_compiled_log_likelihood_on_cuda_matches_eager():
    """Each chunk's log-weights from the replayed CUDA graph, the eager ones
    under the same seed; a chunk kept stays valid after the next replay."""
    from torch._dynamo.utils import counters

    data = load_dataset("mnist-mini")
    model, guide = paper_architecture(1, data_mean=data.train_mean)
    model.cuda(), guide.cuda()
    x = torch.bernoulli(data.test[:20]).cuda()
    ll = CompiledLogLikelihood(model, guide)
    skips = counters["inductor"]["cudagraph_skips"]
    with _quiet_validation():
        for _ in range(2):  # compile, warm up and record
            ll(x, num_samples=100, chunk_size=50)
        torch.manual_seed(7)
        chunks = list(ll.chunks(x, num_samples=150, chunk_size=50))
        torch.manual_seed(7)
        ours = ll(x, num_samples=500, chunk_size=50)
        torch.manual_seed(7)
        eager = log_likelihood(model, guide, x, num_samples=500, chunk_size=50)
    assert ll.compiled and counters["inductor"]["cudagraph_skips"] == skips
    first, second = (c.log_weights for c in chunks[:2])
    assert first.is_cuda and not torch.equal(first, second)
    torch.testing.assert_close(ours, eager, rtol=1e-5, atol=1e-3)
