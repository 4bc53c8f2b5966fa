"""Networks, distributions, likelihoods, the paper's models and guides, the
guide zoo, the sigmoid belief network, and the registry of named builders.

The bottom layer: nothing here imports inference, the compiled path or runs.
"""

# Its names are imported from their modules (and from pyro_iwae itself), not
# from this package: what it exports is its modules.
__all__ = [
    "distributions",
    "guides",
    "likelihoods",
    "models",
    "networks",
    "registry",
    "sbn",
]
