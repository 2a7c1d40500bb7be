"""The DiffuSETS / ECGTwin evaluation benchmark (docs/evaluation.md): `run_evaluation` runs it all."""

from ecgtwin.evaluate.run import run_evaluation

__all__ = ["run_evaluation"]
