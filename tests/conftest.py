import pyro
import pytest
from linear_gaussian import LinearGaussian


@pytest.fixture(autouse=True)
def _fresh_pyro():
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield


@pytest.fixture
def lg():
    return LinearGaussian()
