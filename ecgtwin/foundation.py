"""`ecgtwin pretrain`: a public foundation model, trained non-privately on public ECGs, for the sites to
start from (DP-LDM, Ghalebikesabi et al. 2023: pretraining on public data that resembles the private data
is what makes DP fine-tuning work).

The foundation is an ordinary checkpoint folder (what `ecgtwin generate` reads) plus a model card:
FOUNDATION/card.json and card.md hold the source, records, patients, steps and losses per stage, the config,
the sha256 of each weight file and the command that reproduces it. It uses the fixed population
normaliser, the one that federated and DP training use, so that sites can fine-tune it as it is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shlex
import tempfile
from pathlib import Path
from typing import Sequence

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.conditioning import ensure_population_normalizer
from ecgtwin.config import STAGES, ExperimentConfig, to_dict
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.preprocess import PreprocessConfig
from ecgtwin.data.store import SiteStore, merge_stores
from ecgtwin.data.synthetic import PUBLIC_PROFILE, synthesize_consortium
from ecgtwin.errors import MissingInput, UserError
from ecgtwin.train.centralised import check_or_save_config, train_stage

# The simulator's public population: a seed no site, demo or benchmark consortium uses (they use 0..101), and
# its own profile (PUBLIC_PROFILE: another condition mix, no LBBB at all)
FOUNDATION_SEED = 7_919_101


@dataclasses.dataclass(frozen=True)
class Corpus:
    """One more public database a foundation trains on: a reader's source name and its folder."""

    source: str
    root: Path

    @classmethod
    def parse(cls, text: str) -> Corpus:
        """`challenge=../shared/data/cinc2021` -> Corpus("challenge", Path(...))."""
        from ecgtwin.data.readers import SOURCES

        source, sep, root = text.partition("=")
        if not sep or not root or source not in SOURCES or source == "synthetic":
            raise UserError(f"--corpus {text!r}: write SOURCE=FOLDER with SOURCE one of "
                            f"{', '.join(s for s in sorted(SOURCES) if s != 'synthetic')}")
        return cls(source, Path(root))


def public_store(source: str, root: Path | None, out: Path, config: ExperimentConfig, patients: int,
                 records_per_patient: int, rate: int | None = None, progress: bool = False) -> SiteStore:
    """The public training store: the simulator's public population, or a public corpus through the readers."""
    preprocess = PreprocessConfig(n_samples=config.data.n_samples, duration_s=config.data.duration_s)
    if source == "synthetic":
        with tempfile.TemporaryDirectory() as tmp:
            synthesize_consortium(Path(tmp), sites=1, patients_per_site=patients,
                                  records_per_patient=records_per_patient, seed=FOUNDATION_SEED,
                                  duration_s=config.data.duration_s, progress=progress, profiles=(PUBLIC_PROFILE,))
            site = next(p for p in sorted(Path(tmp).iterdir()) if p.is_dir())
            prepare_store("synthetic", site, out, preprocess, on_reject=lambda r: None, progress=progress)
    else:
        if root is None:
            raise UserError(f"--source {source} needs --root (the public corpus' folder)")
        options = {"rate": rate} if rate is not None and source == "ptbxl" else {}
        prepare_store(source, root, out, preprocess, progress=progress, **options)
    return SiteStore(out)


def pooled_public_store(source: str, root: Path | None, corpora: Sequence[Corpus], out: Path,
                        config: ExperimentConfig, patients: int, records_per_patient: int, rate: int | None = None,
                        progress: bool = False) -> SiteStore:
    """The public store of the main source and the further corpora, merged into one (each part's ids named
    after its source, so that two databases' patient 17 stay two patients)."""
    if not corpora:
        return public_store(source, root, out, config, patients, records_per_patient, rate, progress)
    parts = {source: public_store(source, root, out.with_name(f"{out.name}-part-0"), config, patients,
                                  records_per_patient, rate, progress)}
    for i, corpus in enumerate(corpora, start=1):
        name = corpus.source if corpus.source not in parts else f"{corpus.source}-{i}"
        parts[name] = public_store(corpus.source, corpus.root, out.with_name(f"{out.name}-part-{i}"), config,
                                   patients, records_per_patient, progress=progress)
    return merge_stores(parts, out)


def pretrain(config: ExperimentConfig, source: str, out: str | Path, root: Path | None = None, patients: int = 200,
             records_per_patient: int = 3, rate: int | None = None, command: list[str] | None = None,
             progress: bool = False, device: str = "cpu", corpora: Sequence[Corpus] = (),
             continue_from: str | Path | None = None) -> dict:
    """Train the three stages non-privately on public data into the foundation folder `out`; returns the card.
    `corpora` are more public databases pooled with the main source; `continue_from` is a foundation whose
    weights every stage starts from (e.g. the simulator's foundation, trained on further on real ECGs)."""
    out = Path(out)
    # a foundation is the whole model: every stage trained in full, whatever a fine-tuning config says
    config = dataclasses.replace(config, **{s: dataclasses.replace(config.stage(s), trainable="all") for s in STAGES})
    checkpoint = Checkpoint(out)
    check_or_save_config(checkpoint, config)
    ensure_population_normalizer(out)  # the sites' fixed statistics, not fitted on this corpus
    with tempfile.TemporaryDirectory(prefix="ecgtwin-public-") as tmp:  # the corpus' store is not part of it
        store = pooled_public_store(source, root, corpora, Path(tmp) / "store", config, patients,
                                    records_per_patient, rate, progress)
        stages = {stage: train_stage(stage, config, store.path, out, progress=progress, device=device,
                                     foundation=continue_from)
                  for stage in STAGES}
        records, patient_count, rejected = len(store), len(store.patients), len(store.rejected())
        parts = store.manifest.get("summary", {}).get("parts", {source: records})
    for stage in STAGES:  # optimiser states: only for resuming an interrupted pretraining
        (out / f"{stage}_state.pt").unlink(missing_ok=True)
    card = {
        "source": source, "root": str(root) if root else None,
        "seed": FOUNDATION_SEED if source == "synthetic" else None,
        "records": records, "patients": patient_count, "rejected": rejected,
        "stages": {s: {"steps": r["steps"], "first_loss": r["first_loss"], "final_loss": r["final_loss"]}
                   for s, r in stages.items()},
        "config": to_dict(config),
        "sha256": {f"{s}.safetensors": hashlib.sha256(checkpoint.weights_path(s).read_bytes()).hexdigest()
                   for s in STAGES},
        "command": shlex.join(command) if command else None,
        "corpora": [{"source": source, "root": str(root) if root else None},
                    *({"source": c.source, "root": str(c.root)} for c in corpora)],
        "records_per_corpus": parts,
        "continued_from": _origin(continue_from),
    }
    (out / "card.json").write_text(json.dumps(card, indent=2))
    (out / "card.md").write_text(_card_markdown(card))
    return {"foundation": str(out), **card}


def foundation_weights(folder: str | Path, stage: str) -> dict:
    """A stage's weights from a foundation (or any checkpoint) folder, as arrays."""
    checkpoint = Checkpoint(folder)
    if not checkpoint.path.is_dir():
        raise MissingInput(f"{checkpoint.path}: foundation folder does not exist (make one with ecgtwin pretrain)")
    return checkpoint.load_arrays(stage)


def _origin(foundation: str | Path | None) -> dict | None:
    """The foundation a pretraining continued from: its folder and the sha256 of its weights (its card's)."""
    if foundation is None:
        return None
    card = Path(foundation) / "card.json"
    return {"path": str(foundation), "sha256": json.loads(card.read_text())["sha256"] if card.is_file() else None}


def _card_markdown(card: dict) -> str:
    lines = ["# Foundation model card", "",
             f"- source: {card['source']}" + (f" (seed {card['seed']}, the simulator's public population)"
                                             if card["seed"] is not None else f" ({card['root']})"),
             f"- records: {card['records']}, patients: {card['patients']}"
             + (f" ({card['rejected']} records refused by the quality checks)" if card.get("rejected") else ""),
             *([f"- pooled corpora: " + ", ".join(f"{name} ({n} records)" for name, n in card["records_per_corpus"].items())]
               if len(card.get("records_per_corpus", {})) > 1 else []),
             *([f"- continued from: {card['continued_from']['path']}"] if card.get("continued_from") else []),
             f"- reproduce: `{card['command']}`" if card["command"] else "- reproduce: (called from Python)",
             "", "| stage | steps | first loss | final loss |", "|---|---|---|---|"]
    lines += [f"| {s} | {v['steps']} | {v['first_loss']:.4g} | {v['final_loss']:.4g} |" for s, v in card["stages"].items()]
    lines += ["", "| file | sha256 |", "|---|---|"] + [f"| {k} | `{v}` |" for k, v in card["sha256"].items()]
    lines += ["", "Trained without DP on public data only: no site's patient is in it. The config is in card.json."]
    return "\n".join(lines) + "\n"
