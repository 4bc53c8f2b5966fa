"""Your own data, likelihood and architecture: data files, binarisation as a
choice, each likelihood's density, and the command line on a Gaussian linear
model whose log p(x) is known in closed form."""

import json
import math

import numpy as np
import pytest
import scipy.stats
import torch
from test_cli import assert_ok, assert_one_line_error, invoke

from pyro_iwae import load_run
from pyro_iwae.data import DataError, load_dataset
from pyro_iwae.nn.distributions import ContinuousBernoulliImage
from pyro_iwae.nn.likelihoods import Likelihood, support_problem

# -- data files --------------------------------------------------------------


def test_npy_file_is_split_and_kept_as_given(tmp_path):
    x = np.random.default_rng(0).normal(size=(50, 4, 4)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    data = load_dataset(tmp_path / "d.npy", binarize="none", test_fraction=0.2)
    assert data.train.shape == (40, 16) and data.test.shape == (10, 16)
    assert data.image_shape == (4, 4) and data.binarize == "none"
    rows = {tuple(r) for r in torch.cat([data.train, data.test]).tolist()}
    assert rows == {tuple(r) for r in torch.as_tensor(x).reshape(50, 16).tolist()}
    again = load_dataset(tmp_path / "d.npy", binarize="none", test_fraction=0.2)
    assert torch.equal(again.test, data.test)  # the split is fixed


def test_npz_and_pt_files(tmp_path):
    train, test = torch.rand(30, 6), torch.rand(7, 6)
    np.savez(tmp_path / "d.npz", train=train.numpy(), test=test.numpy())
    torch.save({"train": train, "test": test}, tmp_path / "d.pt")
    torch.save(train, tmp_path / "t.pt")
    for name in ("d.npz", "d.pt"):
        data = load_dataset(tmp_path / name, binarize="none")
        assert torch.equal(data.train, train) and torch.equal(data.test, test)
        assert data.image_shape is None
    assert load_dataset(tmp_path / "t.pt", binarize="none").train.shape == (27, 6)
    static = load_dataset(tmp_path / "d.npz", binarize="static")
    assert set(static.train.unique().tolist()) <= {0.0, 1.0}
    dynamic = load_dataset(tmp_path / "d.npz", binarize="dynamic")
    assert torch.equal(dynamic.train, train)
    assert set(dynamic.test.unique().tolist()) <= {0.0, 1.0}


def test_builtin_data_binarised_only_when_asked():
    grey = load_dataset("mnist-mini", binarize="none")
    assert 0 < float(grey.test.mean()) < 1 and len(grey.test.unique()) > 2
    static = load_dataset("mnist-mini", binarize="static")
    assert set(static.train.unique().tolist()) == {0.0, 1.0}


@pytest.mark.parametrize(
    "arrays, fragment",
    [
        ({"foo": np.zeros((3, 3))}, "not an array named train"),
        ({"train": np.zeros(5)}, "shape [5]"),
        ({"train": np.full((4, 2), np.nan)}, "nan or infinite"),
        # Finite in float64: it was said to hold nan or infinite values.
        ({"train": np.full((4, 2), 1e300)}, "beyond float32's range"),
        ({"train": np.zeros((4, 2)), "test": np.zeros((4, 3))}, "same shape"),
    ],
)
def test_bad_files(tmp_path, arrays, fragment):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DataError, match="bad.npz") as e:
        load_dataset(tmp_path / "bad.npz", binarize="none")
    assert fragment in str(e.value) and "\n" not in str(e.value)


def test_a_missing_data_file_says_which_setting_to_point_at_it(tmp_path):
    # It read "pass (dataset) the path of a .npy, .npz, .pt file ..., or where it
    # is now": a setting in brackets, and a fix trailing after the file types.
    missing = tmp_path / "none.npy"
    with pytest.raises(DataError) as e:
        load_dataset(missing)
    assert str(e.value) == (
        f"data file {missing} not found; set dataset to where it is now, or to "
        "another .npy, .npz or .pt file of shape [N, ...]"
    )
    result = invoke("fit", "--dataset", missing, "--quiet")
    assert_one_line_error(
        result, f"{missing} not found; set --dataset to where it is now, or to"
    )


def test_a_folder_given_as_the_data_file_is_called_a_folder(tmp_path):
    # It said "data file .../dir.npy not found" of a folder that is there.
    folder = tmp_path / "dir.npy"
    folder.mkdir()
    with pytest.raises(DataError) as e:
        load_dataset(folder)
    assert str(e.value) == (
        f"{folder} is a folder, not a data file; set dataset to a .npy, .npz or .pt "
        "file of shape [N, ...]"
    )
    result = invoke("fit", "--dataset", folder, "--quiet", "--out", tmp_path / "r")
    assert_one_line_error(result, "is a folder, not a data file; set --dataset")


def test_missing_file_and_binarising_values_outside_unit_interval(tmp_path):
    with pytest.raises(DataError, match="not found"):
        load_dataset(tmp_path / "none.npy")
    np.save(tmp_path / "wide.npy", np.linspace(-1, 2, 40).reshape(20, 2))
    with pytest.raises(DataError, match=r"binarize dynamic needs values in \[0, 1\]"):
        load_dataset(tmp_path / "wide.npy", binarize="dynamic")
    # The command line names its option (it said "use binarize none").
    result = invoke("fit", "--dataset", tmp_path / "wide.npy", "--binarize", "dynamic")
    assert_one_line_error(result, "--binarize dynamic needs", "use --binarize none")


# -- likelihoods: proper densities, in nats ----------------------------------


def test_bernoulli_against_torch():
    logits, x = torch.randn(3, 5), torch.bernoulli(torch.full((3, 5), 0.4))
    expected = torch.distributions.Bernoulli(logits=logits).log_prob(x).sum(-1)
    got = Likelihood("bernoulli", 5)(logits).log_prob(x)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("sigma", [0.3, None])
def test_gaussian_against_scipy(sigma):
    likelihood = Likelihood("gaussian", 4, sigma).double()
    if sigma is None:
        with torch.no_grad():
            likelihood.log_sigma.copy_(torch.tensor([-1.0, 0.0, 0.5, 1.0]))
    loc = torch.randn(2, 4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64)
    scale = likelihood.log_sigma.exp().detach().numpy()
    expected = scipy.stats.norm.logpdf(x.numpy(), loc.numpy(), scale).sum(-1)
    got = likelihood(loc).log_prob(x).detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10)


def test_continuous_bernoulli_is_a_normalised_density():
    logits = torch.tensor([-3.0, -0.2, 0.0, 0.001, 1.5], dtype=torch.float64)
    d = ContinuousBernoulliImage(logits)
    x = torch.tensor([0.1, 0.5, 0.9, 0.3, 1.0], dtype=torch.float64)
    expected = torch.distributions.ContinuousBernoulli(logits=logits).log_prob(x)
    assert torch.allclose(d.log_prob(x), expected.sum())
    # Each unit's density integrates to 1 over [0, 1] (its constant included).
    for logit in logits.tolist():
        p = 1 / (1 + math.exp(-logit))
        one = ContinuousBernoulliImage(torch.tensor([logit], dtype=torch.float64))

        def density(v, one=one):
            return math.exp(one.log_prob(torch.tensor([v], dtype=torch.float64)))

        total, _ = scipy.integrate.quad(density, 0, 1)
        assert total == pytest.approx(1, abs=1e-7), p


def test_support_problems():
    assert support_problem("gaussian", torch.tensor([[-5.0, 3.0]])) is None
    assert "outside [0, 1]" in support_problem(
        "continuous-bernoulli", torch.tensor([[0.5, 1.5]])
    )
    assert support_problem("continuous-bernoulli", torch.tensor([[0.0, 0.7]])) is None
    grey = support_problem("bernoulli", torch.tensor([[0.5, 1.0]]))
    # The library's advice names Python arguments (cli_text makes them options).
    assert "binarize='dynamic'" in grey
    assert "nan" in support_problem("gaussian", torch.tensor([[float("nan")]]))
    # None: a user's model's own likelihood, whose support only it knows.
    assert support_problem(None, torch.tensor([[-5.0, 0.5]])) is None
    assert "nan" in support_problem(None, torch.tensor([[float("nan")]]))


# -- the command line on a Gaussian linear model with a known log p(x) -------

LG_DIM, LG_LATENT = 5, 2


@pytest.fixture(scope="module")
def linear_data(tmp_path_factory):
    """x = W z + b + noise, z ~ N(0, I_2), in a .npy file (no test set)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(LG_DIM, LG_LATENT, generator=g)
    b = torch.randn(LG_DIM, generator=g)
    z = torch.randn(1500, LG_LATENT, generator=g)
    x = z @ w.T + b + 0.5 * torch.randn(1500, LG_DIM, generator=g)
    path = tmp_path_factory.mktemp("data") / "linear.npy"
    np.save(path, x.numpy())
    return path


LINEAR = [
    "--likelihood",
    "gaussian",
    "--hidden",
    "",
    "--latent-dim",
    LG_LATENT,
    "--guide",
    "lowrank",
    "--epochs",
    5,
    "--lr",
    0.01,
    "--test-limit",
    100,
    "--quiet",
]


def exact_log_px(run_dir, x):
    """log p(x) of the trained linear model: N(b, W W^T + diag(sigma^2))."""
    _, model, _ = load_run(run_dir)
    linear = model.pixels[-1]
    w, b = linear.weight.double(), linear.bias.double()
    cov = w @ w.T + torch.diag(model.likelihood.log_sigma.double().exp() ** 2)
    with torch.no_grad():
        return torch.distributions.MultivariateNormal(b, cov).log_prob(x.double())


def test_cli_gaussian_linear_model_matches_its_exact_log_likelihood(
    linear_data, tmp_path
):
    run = tmp_path / "run"
    assert_ok(invoke("fit", "--dataset", linear_data, *LINEAR, "--out", run))
    config = json.loads((run / "config.json").read_text())
    assert config["x_dim"] == LG_DIM and config["binarize"] is None
    result = invoke("eval-nll", run, "--k", 500, "--limit", 0, "--quiet")
    assert_ok(result)
    assert "bits/dim = " in result.output
    report = json.loads((run / "eval-test-k500.json").read_text())
    assert report["points"] == 150
    estimates = torch.tensor(
        [float(v) for v in (run / "estimates-test-k500.txt").read_text().split()],
        dtype=torch.float64,
    )
    test = load_dataset(linear_data, binarize="none").test
    exact = exact_log_px(run, test)
    # The estimate is within its standard error of the exact value, and a
    # bound: never above it by more than Monte Carlo noise.
    assert abs(report["nll"] + float(exact.mean())) < report["stderr"]
    gap = exact - estimates
    # Per point, the delta-method standard error of the estimate from its ESS.
    rows = (run / report["diagnostics_file"]).read_text().splitlines()[1:]
    ess = torch.tensor([float(row.split()[0]) for row in rows], dtype=torch.float64)
    noise = ((500 / ess - 1) / 499).sqrt().pow(2).sum().sqrt() / len(rows)
    assert -3 * noise < float(gap.mean()) < 0.1 * report["stderr"], noise
    bits = report["nll"] / (LG_DIM * math.log(2))
    assert report["bits_per_dim"] == pytest.approx(bits)
    # Trained: near the data's own log-likelihood, far above the untrained one.
    assert report["nll"] < 9.5


def test_data_that_do_not_fit_the_likelihood_get_advice_in_python_terms():
    # The library's advice named command-line options ("use --likelihood
    # gaussian") to Python callers too.
    from pyro_iwae_cli.options import cli_text

    wide = support_problem("bernoulli", torch.tensor([0.0, 2.0]))
    assert wide.endswith(
        "use likelihood='gaussian', or scale them into [0, 1] and binarise"
    )
    grey = support_problem("bernoulli", torch.tensor([0.0, 0.5]))
    assert grey.endswith(
        "use binarize='dynamic' or binarize='static' for values in [0, 1], or "
        "likelihood='continuous-bernoulli'"
    )
    outside = support_problem("continuous-bernoulli", torch.tensor([2.0]))
    assert outside.endswith("scale them into [0, 1] or use likelihood='gaussian'")
    assert "--" not in wide + grey + outside
    # The command line spells them as its options.
    assert cli_text(grey).endswith(
        "use --binarize dynamic or --binarize static for values in [0, 1], or "
        "--likelihood continuous-bernoulli"
    )


def test_cli_data_that_do_not_fit_the_likelihood(linear_data, tmp_path):
    result = invoke("fit", "--dataset", linear_data, "--out", tmp_path / "r")
    assert_one_line_error(result, "bernoulli", "--likelihood gaussian")
    result = invoke(
        "fit", "--dataset", linear_data, "--likelihood", "continuous-bernoulli"
    )
    assert_one_line_error(result, "outside [0, 1]", "continuous-bernoulli")
    result = invoke("fit", "--dataset", linear_data, "--binarize", "dynamic")
    assert_one_line_error(result, "needs values in [0, 1]")
    assert not (tmp_path / "r" / "checkpoint.pt").exists()


def test_cli_bad_options(tmp_path):
    assert_one_line_error(invoke("fit", "--sigma", 0.5), "--sigma", "gaussian")
    assert_one_line_error(invoke("fit", "--hidden", "20,x"), "--hidden", "200,200")
    assert_one_line_error(invoke("fit", "--dataset", tmp_path / "no.npy"), "not found")
    assert_one_line_error(invoke("fit", "--dataset", "cifar"), "cifar", ".npz")
    assert_one_line_error(
        invoke("fit", "--guide", "nowhere.guides:build"),
        "cannot import guide 'nowhere.guides:build'",
        "ModuleNotFoundError",
    )
    assert_one_line_error(invoke("fit", "--model", "nope"), "unknown model 'nope'")


def test_cli_seed_style_configuration_on_mnist_grey_levels(tmp_path):
    """One hidden ReLU layer, Gaussian likelihood of fixed variance, grey levels."""
    run = tmp_path / "seed"
    args = ["--likelihood", "gaussian", "--sigma", 0.1, "--hidden", 64]
    args += ["--activation", "relu", "--latent-dim", 8, "--binarize", "none"]
    args += ["--train-limit", 200, "--test-limit", 20, "--batch-size", 50]
    assert_ok(invoke("fit", *args, "--epochs", 1, "--quiet", "--out", run))
    config = json.loads((run / "config.json").read_text())
    assert config["hidden"] == [64] and config["sigma"] == 0.1
    result = invoke("eval-nll", run, "--k", 5, "--limit", 10, "--quiet")
    assert_ok(result)
    assert "bits/dim" in result.output and "z1 " in result.output
    assert_ok(invoke("sample", run, "--n", 4))


def test_a_string_array_is_named_by_its_dtype_in_one_short_line(tmp_path):
    np.save(tmp_path / "words.npy", np.array([["a", "b"], ["c", "d"]]))
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "words.npy", binarize="none")
    message = str(e.value)
    assert "train is an array of <U1, not numbers" in message
    assert "save integers, floats or booleans" in message
    # Not torch's list of every dtype it takes.
    assert "float16" not in message and len(message) < 160 + len(str(tmp_path))


@pytest.mark.parametrize(
    "name, write, reason",
    [
        ("bad.npy", lambda p: p.write_bytes(b"\x93NUMPY garbage"), "damaged"),
        ("bad.npz", lambda p: p.write_bytes(b"PK\x03\x04 truncated zip"), "damaged"),
        ("bad.pt", lambda p: p.write_bytes(b"not a torch file"), "damaged"),
        # numpy takes a file of other bytes for a pickle: not what it is.
        ("text.npy", lambda p: p.write_text("hello\n"), "not a NumPy .npy file"),
        ("text.npz", lambda p: p.write_text("hello\n"), "not a NumPy .npz file"),
        (
            "objects.npy",
            lambda p: np.save(p, np.array([[1, 2], [3]], dtype=object)),
            "pickled Python objects",
        ),
    ],
)
def test_an_unreadable_file_gets_one_short_line_that_says_how_to_save_it(
    tmp_path, name, write, reason
):
    path = tmp_path / name
    write(path)
    with pytest.raises(DataError) as info:
        load_dataset(str(path))
    message = str(info.value)
    assert reason in message and "np.save, np.savez or torch.save" in message
    assert "allow_pickle" not in message and "\n" not in message
    assert len(message) < 250


@pytest.mark.parametrize(
    "value, what",
    [
        ({"train": np.random.default_rng(0).random((100, 4))}, "(numpy arrays)"),
        (torch.utils.data.TensorDataset(torch.rand(10, 4)), "(TensorDataset)"),
    ],
)
def test_a_pt_file_of_python_objects_is_said_to_hold_them_and_how_to_save_tensors(
    tmp_path, value, what
):
    # Before: "it is damaged, or not written by ... torch.save", though it was.
    path = tmp_path / "objects.pt"
    torch.save(value, path)
    with pytest.raises(DataError) as info:
        load_dataset(path, binarize="none")
    message = str(info.value)
    assert f"it holds Python objects {what}" in message and "damaged" not in message
    assert 'torch.save({"train": torch.as_tensor(a)}, path)' in message
    assert "weights_only" not in message and "\n" not in message
    assert len(message) < 230 + len(str(path))


@pytest.mark.parametrize("layout", ["coo", "csr"])
def test_a_sparse_tensor_in_a_pt_file_is_read_as_its_dense_values(
    tmp_path, layout, recwarn
):
    # Before, torch.isfinite failed on it with a 100-line dispatcher error.
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(200, 16, generator=g) > 0.5).float()
    sparse = train.to_sparse() if layout == "coo" else train.to_sparse_csr()
    torch.save({"train": sparse, "test": train[:5].to_sparse()}, tmp_path / "s.pt")
    recwarn.clear()
    data = load_dataset(tmp_path / "s.pt", binarize="none")
    # Nor is torch.load's note on its check of sparse tensors passed on.
    assert not [w for w in recwarn if "weights_only" in str(w.message)]
    assert data.train.layout == torch.strided and torch.equal(data.train, train)
    assert torch.equal(data.test, train[:5])


@pytest.mark.parametrize("dtype", [">f4", ">f8", ">i2", ">u2"])
def test_a_big_endian_array_is_read_with_its_values_kept(tmp_path, dtype):
    # Before: "train is an array of >f4, not numbers".
    values = np.random.default_rng(0).random((200, 16)) * 1000
    array = values.astype(dtype)
    np.save(tmp_path / "be.npy", array)
    np.savez(tmp_path / "be.npz", train=array, test=array[:3])
    expected = torch.from_numpy(array.astype(np.float32))
    data = load_dataset(tmp_path / "be.npz", binarize="none")
    assert torch.equal(data.train, expected) and torch.equal(data.test, expected[:3])
    data = load_dataset(tmp_path / "be.npy", binarize="none")  # a test set held out
    both = torch.cat([data.train, data.test])
    assert torch.equal(both.sort(0).values, expected.sort(0).values)


def test_an_empty_test_array_is_said_to_be_empty_and_may_be_left_out(tmp_path):
    # Before: "test has shape [0, 784]; save an array of shape [N, ...]".
    train = np.random.default_rng(0).random((50, 784))
    np.savez(tmp_path / "e.npz", train=train, test=np.zeros((0, 784)))
    with pytest.raises(DataError) as info:
        load_dataset(tmp_path / "e.npz", binarize="none")
    assert str(info.value) == (
        f"{tmp_path / 'e.npz'}: test is empty (shape [0, 784], no points); leave it "
        "out, and a share of the training points is held out as the test set "
        "(test_fraction=0.1), or save test points"
    )
    # Left out, 10% of the points are held out.
    np.savez(tmp_path / "e.npz", train=train)
    data = load_dataset(tmp_path / "e.npz", binarize="none")
    assert data.train.shape == (45, 784) and data.test.shape == (5, 784)
    np.savez(tmp_path / "e.npz", train=np.zeros((0, 784)))
    with pytest.raises(DataError, match="train is empty .*; save at least one point$"):
        load_dataset(tmp_path / "e.npz", binarize="none")


def test_one_point_and_one_test_point_are_spoken_of_in_the_singular(tmp_path):
    # Before: "holds 1 points", "reconstructions of the 1 test points there are".
    np.save(tmp_path / "one.npy", np.ones((1, 4)))
    with pytest.raises(DataError, match=r"one.npy holds 1 point, too few to hold"):
        load_dataset(tmp_path / "one.npy", binarize="none")
    x = np.random.default_rng(0).random((21, 4, 4))
    np.savez(tmp_path / "d.npz", train=x[:20], test=x[20:])
    run = tmp_path / "run"
    args = ["--likelihood", "gaussian", "--hidden", 4, "--latent-dim", 2]
    assert_ok(invoke("fit", "--dataset", tmp_path / "d.npz", *args, "--epochs", 1,
                     "--quiet", "--out", run))  # fmt: skip
    result = invoke("sample", run, "--n", 4)
    assert_ok(result)
    assert "reconstructions of the one test point there is\n" in result.output


def test_a_tensor_saved_with_requires_grad_is_read_as_plain_values(tmp_path):
    # fit died with "Trying to backward through the graph a second time": the
    # data kept requires_grad, and every step backpropagated into them.
    g = torch.Generator().manual_seed(0)
    train = (torch.rand(60, 16, generator=g) > 0.5).float().requires_grad_()
    torch.save(train, tmp_path / "grad.pt")
    torch.save(
        {"train": train, "test": train[:5].detach().requires_grad_()},
        tmp_path / "both.pt",
    )
    data = load_dataset(tmp_path / "both.pt", binarize="none")
    assert not data.train.requires_grad and not data.test.requires_grad
    assert torch.equal(data.train, train.detach())
    options = ["--batch-size", 20, "--particles", 2, "--epochs", 1, "--quiet"]
    run = tmp_path / "r"
    assert_ok(invoke("fit", "--dataset", tmp_path / "grad.pt", *options, "--out", run))
    assert (run / "checkpoint.pt").is_file()
