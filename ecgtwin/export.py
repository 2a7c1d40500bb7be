"""`ecgtwin export`: the part of a checkpoint folder that may be shared as "the model".

A checkpoint folder also holds things that stay at the site: the statement-embedding cache (keyed by the
reports' own text), per-step loss logs with sampled-patient counts, optimiser states, and possibly a
patient-info normaliser fitted on the site's patients. The bundle holds only the weights, the config, the
FIXED population normaliser and a model card (card.json, card.md): what was trained, under which policy,
and the epsilon and delta spent (from the site's ledger, or the released figures of a federated run).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.conditioning import NORMALIZER_FILE, PatientInfoNormalizer, read_normalizer
from ecgtwin.config import STAGES
from ecgtwin.errors import MissingInput, UserError
from ecgtwin.privacy import Ledger, load_policy


def export_model(checkpoint: str | Path, out: str | Path, policy: Path | None = None,
                 ledger: Path | None = None) -> dict:
    """Write the shareable bundle of `checkpoint` into `out` (which must not exist) and return its card."""
    source, out = Checkpoint(checkpoint), Path(out)
    config = source.config()
    stages = [s for s in STAGES if source.has(s)]
    if not stages:
        raise MissingInput(f"{source.path}: no weights to export")
    if read_normalizer(source.path) != PatientInfoNormalizer():
        raise UserError(f"{source.path}: its patient-info normaliser was fitted on a site's patients (an un-noised "
                        "statistic of them); only models trained with the fixed population statistics "
                        "(federated or DP training) can be exported")
    if out.exists():
        raise UserError(f"{out}: already exists; export into a new folder")
    out.mkdir(parents=True)
    for stage in stages:
        shutil.copyfile(source.weights_path(stage), out / source.weights_path(stage).name)
    shutil.copyfile(source.path / "config.yaml", out / "config.yaml")
    (out / NORMALIZER_FILE).write_text(PatientInfoNormalizer().to_json())
    card = {"stages": stages, "model": config.name, "privacy": _privacy(source.path, policy, ledger),
            "files": {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}}
    (out / "card.json").write_text(json.dumps(card, indent=2))
    (out / "card.md").write_text(_card_markdown(card))
    return {"bundle": str(out), **card}


def _privacy(folder: Path, policy_path: Path | None, ledger_path: Path | None) -> dict:
    """What the card says of privacy: a site's policy and ledger, or the released epsilon of every site of the
    federated run the model came from (RUN/model -> RUN/metrics.jsonl), or that nothing is known."""
    if policy_path is not None:
        policy = load_policy(policy_path)
        entries = Ledger(ledger_path).entries() if ledger_path is not None else []
        return {"differentially_private": policy.private, "site": policy.site, "unit": policy.unit,
                "epsilon_budget": policy.epsilon, "delta": policy.delta,
                "epsilon_spent": entries[-1]["epsilon"] if entries else None, "releases": len(entries)}
    metrics = folder.parent / "metrics.jsonl"
    if folder.name == "model" and metrics.is_file():
        history = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        last = {site: r for e in history for site, r in e["sites"].items()}
        sites = {site: {"epsilon_spent": r.get("epsilon"), "delta": r.get("delta")} for site, r in last.items()}
        return {"differentially_private": all(s["epsilon_spent"] is not None for s in sites.values()),
                "federated_sites": sites}
    return {"differentially_private": None, "note": "no policy or ledger given: the privacy of these weights is "
                                                    "not stated"}


def _card_markdown(card: dict) -> str:
    privacy = card["privacy"]
    lines = ["# Model card", "", f"Stages: {', '.join(card['stages'])}; configuration `{card['model']}`.", "",
             "## Privacy", ""]
    lines += [f"- {k}: {v}" for k, v in privacy.items() if k != "federated_sites"]
    for site, s in privacy.get("federated_sites", {}).items():
        lines.append(f"- {site}: epsilon spent {s['epsilon_spent']}, delta {s['delta']}")
    lines += ["", "## Files (sha256)", ""] + [f"- `{name}` {digest}" for name, digest in card["files"].items()]
    lines += ["", "Not included, and never to leave a site: the statement-embedding cache, loss logs, optimiser "
              "states, the ledger and the site's stores."]
    return "\n".join(lines) + "\n"
