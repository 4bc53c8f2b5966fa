"""Inference: the importance weighted objectives, their traces, and the estimates
of a trained model (chunked log-likelihood, diagnostics, AIS, gradient checks).

Depends on :mod:`pyro_iwae.nn` and Pyro only; the compiled path
(:mod:`pyro_iwae.compiled`) is a layer on top of it.
"""
