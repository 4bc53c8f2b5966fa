"""The ``pyro-iwae`` command line (installed as the package ``pyro_iwae_cli``)."""
