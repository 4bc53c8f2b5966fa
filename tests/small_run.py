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
