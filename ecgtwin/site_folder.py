"""A site folder: where one hospital keeps its data, its privacy policy, its ledger and its working state.

    SITE/store/            the prepared site store (`ecgtwin prepare`)
    SITE/privacy.yaml      the privacy officer's policy (may be read-only)
    SITE/state/            the site's writable state, none of it sent:
        ledger.jsonl       the site's privacy ledger, and site-secret.key (the secret its passes' noise
                           comes from)
        cache/             noise plan, statement embeddings, public negatives
        passes/<key>/      every outcome of a federated pass, kept before it is sent
        checkpoint/        the weights the site had and made
        errors.log         the text of every failure (the server only gets a category)

The state folder is POLICY_DIR/state unless a SuperNode's node config names another (state-path). Every
command that trains or reports on a site opens it through this one object, and a store is accounted in
the ledger its marker names (ledger-marker.json, written at the first charge and kept when the store is
prepared again): another state folder, another command or a re-prepared store never starts a new budget.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from ecgtwin.privacy.ledger import Ledger

POLICY_FILE = "privacy.yaml"
LEDGER_FILE = "ledger.jsonl"


@dataclasses.dataclass(frozen=True)
class SiteFolder:
    store: Path
    policy: Path
    state: Path

    @classmethod
    def at(cls, root: str | Path) -> "SiteFolder":
        """The conventional layout under one folder: ROOT/{store, privacy.yaml, state}."""
        root = Path(root)
        return cls(root / "store", root / POLICY_FILE, root / "state")

    @classmethod
    def of(cls, store: str | Path, policy: str | Path, state: str | Path | None = None) -> "SiteFolder":
        """Explicit paths (a SuperNode's node config); the state folder defaults to POLICY_DIR/state."""
        policy = Path(policy)
        return cls(Path(store), policy, Path(state) if state else policy.parent / "state")

    @property
    def ledger_file(self) -> Path:
        return self.state / LEDGER_FILE

    def ledger(self) -> Ledger:
        """The site's one ledger: the one its store names, else a new one in the state folder."""
        return Ledger.for_store(self.store, self.ledger_file)

    @property
    def cache(self) -> Path:
        return self.state / "cache"

    @property
    def checkpoint(self) -> Path:
        return self.state / "checkpoint"

    @property
    def passes(self) -> Path:
        return self.state / "passes"

    @property
    def errors_log(self) -> Path:
        return self.state / "errors.log"
