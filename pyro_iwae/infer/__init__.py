"""Inference: the importance weighted objectives, their traces, and the estimates
of a trained model (chunked log-likelihood, diagnostics, AIS, gradient checks).

Depends on :mod:`pyro_iwae.nn` and Pyro only; the compiled path
(:mod:`pyro_iwae.compiled`) is a layer on top of it.
"""

# Its names are imported from their modules (and from pyro_iwae itself), not
# from this package: what it exports is its modules.
__all__ = [
    "activity",
    "ais",
    "ais_chains",
    "arguments",
    "broadcast",
    "diagnostics",
    "enumeration",
    "estimable",
    "evaluation",
    "gradient_check",
    "grouped",
    "hooks",
    "joint_likelihood",
    "log_weights",
    "objectives",
    "particle_dims",
    "particles",
    "sampling",
    "support",
    "traces",
]
