"""A small run for the tests of runs and checkpoints: 300 training points, 100
test points, batches of 50, k = 2, one epoch."""

from pyro_iwae import RunConfig

TRAIN, TEST, BATCH, K = 300, 100, 50, 2


def small_config(**changes):
    values = dict(
        train_limit=TRAIN,
        test_limit=TEST,
        batch_size=BATCH,
        num_particles=K,
        epochs=1,
    )
    values.update(changes)
    return RunConfig(**values)


def linear_gaussian_config(dataset, **changes):
    """A one-epoch run of a linear-Gaussian model (no hidden layer, one latent,
    sigma 0.5) on the 3-wide points of the data file ``dataset``, eagerly and
    without test points."""
    values = dict(
        dataset=dataset,
        x_dim=3,
        likelihood="gaussian",
        sigma=0.5,
        hidden=[],
        latent_dim=1,
        epochs=1,
        test_limit=0,
        compile="off",
    )
    values.update(changes)
    return RunConfig(**values)
