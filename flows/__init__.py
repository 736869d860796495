"""Prefect flows of the EXITS pipeline: one flow per stage and the parent flow ``exits-pipeline``.

The flows are thin: their tasks take paths and small values and call the stage functions
of :mod:`exits.pipeline`; every output is a file in the run folder.
"""
from flows.prefect_env import apply_prefect_defaults

# Before Prefect is imported: its settings are read then, and a temporary server inherits them
# (startup timeout for a first start on a fresh machine, no analytics offline).
apply_prefect_defaults()

from flows.deploy import build_deployment, serve_pipeline  # noqa: E402
from flows.detector import train_detector_flow  # noqa: E402
from flows.generator import train_generator_flow  # noqa: E402
from flows.pipeline import exits_pipeline, run_pipeline_flow  # noqa: E402
from flows.prepare import prepare_instances_flow  # noqa: E402
from flows.pseudo_labels import pseudo_labels_flow  # noqa: E402
from flows.report import report_flow  # noqa: E402
from flows.retrieval import retrieve_points_flow  # noqa: E402
from flows.similarity import train_similarity_flow  # noqa: E402

__all__ = ["exits_pipeline", "run_pipeline_flow", "prepare_instances_flow", "train_similarity_flow",
           "retrieve_points_flow", "train_generator_flow", "pseudo_labels_flow", "report_flow", "train_detector_flow",
           "build_deployment", "serve_pipeline"]
