"""ecgtwin: federated, differentially private ECG digital twins (ECGTwin + DiffuSETS)."""

__version__ = "0.1.0"
