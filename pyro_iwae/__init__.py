"""Importance weighted autoencoders (Burda et al. 2016) for Pyro."""

# Registers the compiled path with infer.hooks, for the compile options.
from . import compiled as compiled
from ._version import __version__ as __version__
from .compiled import CompiledLoss, CompileFallbackWarning
from .data import Dataset, load_dataset, minibatches
from .errors import (
    AISError,
    BuilderError,
    DataError,
    ParticleBroadcastError,
    PlateNestingError,
    ProgramError,
    PyroIwaeError,
    RunBusy,
    SupportError,
)
from .infer.activity import active_units, latent_activity
from .infer.ais import (
    AISResult,
    BDMCResult,
    ais_log_likelihood,
    ais_schedule,
    ais_upper_bound,
    bidirectional_log_likelihood,
    sample_joint,
)
from .infer.diagnostics import (
    Diagnostics,
    effective_sample_size,
    importance_resample,
    log_likelihood_with_diagnostics,
    pareto_khat,
)
from .infer.enumeration import GlobalEnumerationError
from .infer.evaluation import (
    EstimateWarning,
    dataset_log_likelihood,
    log_likelihood,
)
from .infer.gradient_check import (
    GradientCheck,
    ParameterCheck,
    check_guide_gradients,
)
from .infer.grouped import CIWELBO, MIWELBO, PIWELBO
from .infer.joint_likelihood import joint_log_likelihood
from .infer.objectives import ESTIMATORS, IWELBO
from .infer.sampling import reconstruct, sample_images
from .infer.support import InaccurateInverseWarning
from .nn.guides import (
    CouplingGuide,
    IAFGuide,
    LowRankGuide,
    PaperGuide,
    paper_architecture,
)
from .nn.likelihoods import LIKELIHOODS
from .nn.models import DATA_PLATE, LATENT_SITES, OBSERVED_SITE, PaperModel
from .nn.registry import (
    GUIDES,
    MODELS,
    build_guide,
    build_model,
    register_guide,
    register_model,
)
from .nn.sbn import SBNGuide, SBNModel, sbn_architecture
from .optim import JointOptim
from .runs.callbacks import CallbackList, FitCallback, StepInfo
from .runs.check_guide import check_run_guide
from .runs.checkpoints import CheckpointError, RunError, load_checkpoint, read_metrics
from .runs.config import RunConfig
from .runs.eval_results import EvalSettings, Evaluation
from .runs.run import (
    Run,
    build_run,
    evaluate_run,
    find_latest_run,
    load_run,
    new_run_dir,
    read_estimates,
    train_run,
)
from .runs.schedules import (
    ConfigError,
    constant_schedule,
    make_objective,
    make_schedule,
    paper_schedule,
)
from .runs.tracking import TrackingError
from .runs.training import TrainingDiverged, fit

__all__ = [
    "BuilderError",
    "CallbackList",
    "CompileFallbackWarning",
    "CompiledLoss",
    "Dataset",
    "GlobalEnumerationError",
    "InaccurateInverseWarning",
    "JointOptim",
    "PlateNestingError",
    "TrackingError",
    "load_dataset",
    "minibatches",
    "AISError",
    "AISResult",
    "BDMCResult",
    "Diagnostics",
    "ais_log_likelihood",
    "ais_schedule",
    "ais_upper_bound",
    "bidirectional_log_likelihood",
    "effective_sample_size",
    "GradientCheck",
    "ParameterCheck",
    "check_guide_gradients",
    "check_run_guide",
    "importance_resample",
    "joint_log_likelihood",
    "log_likelihood_with_diagnostics",
    "pareto_khat",
    "sample_joint",
    "CheckpointError",
    "ConfigError",
    "DataError",
    "EvalSettings",
    "Evaluation",
    "ParticleBroadcastError",
    "ProgramError",
    "PyroIwaeError",
    "Run",
    "RunBusy",
    "FitCallback",
    "RunConfig",
    "RunError",
    "StepInfo",
    "SupportError",
    "TrainingDiverged",
    "build_run",
    "constant_schedule",
    "evaluate_run",
    "find_latest_run",
    "fit",
    "load_checkpoint",
    "load_run",
    "make_objective",
    "make_schedule",
    "new_run_dir",
    "paper_schedule",
    "read_estimates",
    "read_metrics",
    "reconstruct",
    "sample_images",
    "train_run",
    "SBNGuide",
    "SBNModel",
    "sbn_architecture",
    "CIWELBO",
    "CouplingGuide",
    "IAFGuide",
    "LIKELIHOODS",
    "LowRankGuide",
    "EstimateWarning",
    "DATA_PLATE",
    "ESTIMATORS",
    "GUIDES",
    "IWELBO",
    "LATENT_SITES",
    "MIWELBO",
    "MODELS",
    "OBSERVED_SITE",
    "PIWELBO",
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
