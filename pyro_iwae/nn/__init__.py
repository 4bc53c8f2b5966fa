"""Networks, distributions, likelihoods, the paper's models and guides, the
guide zoo, the sigmoid belief network, and the registry of named builders.

The bottom layer: nothing here imports inference, the compiled path or runs.
"""
