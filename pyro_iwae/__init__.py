"""Importance weighted autoencoders (Burda et al. 2016) for Pyro."""

from .evaluation import (
    active_units,
    dataset_log_likelihood,
    latent_activity,
    log_likelihood,
)
from .guides import PaperGuide, paper_architecture
from .models import DATA_PLATE, LATENT_SITES, OBSERVED_SITE, PaperModel
from .objectives import ESTIMATORS, IWELBO
from .registry import (
    GUIDES,
    MODELS,
    build_guide,
    build_model,
    register_guide,
    register_model,
)

__version__ = "0.1.0"

__all__ = [
    "DATA_PLATE",
    "ESTIMATORS",
    "GUIDES",
    "IWELBO",
    "LATENT_SITES",
    "MODELS",
    "OBSERVED_SITE",
    "PaperGuide",
    "PaperModel",
    "active_units",
    "build_guide",
    "build_model",
    "dataset_log_likelihood",
    "latent_activity",
    "log_likelihood",
    "paper_architecture",
    "register_guide",
    "register_model",
]
