"""NVIDIA FLARE's constants with FLARE's values, so scripts and jobs written for FLARE keep their spelling.

Pure values only: this module imports nothing heavy, so the job side (``fedbus.recipes``) re-exports the
names a FLARE ``job.py`` imports (``DataKind``, ``TransferType``, ``NPConstants``) without loading the link.
"""

from __future__ import annotations

import enum


class DataKind(enum.StrEnum):
    """What an aggregator takes in (FLARE's ``nvflare.apis.dxo.DataKind``): WEIGHTS or WEIGHT_DIFF for models."""

    FL_MODEL = "FL_MODEL"
    WEIGHTS = "WEIGHTS"
    WEIGHT_DIFF = "WEIGHT_DIFF"
    METRICS = "METRICS"
    ANALYTIC = "ANALYTIC"
    COLLECTION = "COLLECTION"
    STATISTICS = "STATISTICS"
    PSI = "PSI"
    APP_DEFINED = "APP_DEFINED"


class TransferType(enum.StrEnum):
    """What a script's ``send()`` transmits: whole weights (FULL) or ``local - received`` (DIFF)."""

    FULL = "FULL"
    DIFF = "DIFF"


class ExchangeFormat(enum.StrEnum):
    """The form of ``params`` a script receives and sends: torch tensors (pytorch) or numpy arrays (numpy)."""

    RAW = "raw"
    PYTORCH = "pytorch"
    NUMPY = "numpy"


class NPConstants:
    """The key a numpy job's single array travels under (FLARE's ``NPConstants``)."""

    NUMPY_KEY = "numpy_key"


class FLMetaKey:
    """The meta keys FLARE scripts use (``FLMetaKey.X``), with FLARE's values."""

    NUM_STEPS_CURRENT_ROUND = "NUM_STEPS_CURRENT_ROUND"
    INITIAL_METRICS = "initial_metrics"
    CONFIGS = "configs"
    VALIDATE_TYPE = "validate_type"
    START_ROUND = "start_round"
    CURRENT_ROUND = "current_round"
    TOTAL_ROUNDS = "total_rounds"
    JOB_ID = "job_id"
    SITE_NAME = "site_name"
    SUBMIT_MODEL_NAME = "submit_model_name"


SCAFFOLD_PREFIX = "scaffold.c."
"""SCAFFOLD's control variates travel with the model as extra tensors named ``scaffold.c.<weight name>``; the
client API takes them off before the script sees the params (the strategy defines the same literal)."""
