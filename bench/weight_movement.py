"""Where does non-private fine-tuning move a foundation's weights? The parameter-subset lever of DP fine-tuning.

DP-SGD adds noise of the same size to every trainable coordinate, so a subset that holds most of what
fine-tuning changes, in few parameters, gets more signal per unit of noise (DPDM, DP-LDM). This tool
fine-tunes the foundation's IBE and twin stage without DP on PUBLIC data (the bench's reference population,
which no site's patient is in), measures per module the squared change |W - W0|^2, and chooses the modules
with the densest change (change per parameter) until they hold `--share` of the total. Only the chosen
module names feed a DP run (`trainable: modules`), so choosing them costs no site any privacy.

    python -m bench.weight_movement --store REFERENCE_STORE --out wm/ --record
    python -m bench.privacy_utility --trainable modules ...   # reads the chosen modules from the JSON

--record writes bench/data/benchmarks/weight_movement.json; `python -m bench.tables` renders it in
docs/privacy.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "bench" / "data" / "benchmarks" / "weight_movement.json"
CONFIG = ROOT / "configs" / "demo.yaml"
FOUNDATION = ROOT / "foundations" / "demo"
STAGES = ("ibe", "twin")
STACKS = ("blocks", "layers")  # a transformer's repeated blocks: a module is one sub-layer of one block


def module_of(name: str) -> str:
    """A parameter's module at the granularity the subset is chosen at: "blocks.1.cross_attn.q.weight" ->
    "blocks.1.cross_attn", "final_layer.linear.bias" -> "final_layer"."""
    parts = name.split(".")
    return ".".join(parts[:3] if parts[0] in STACKS and len(parts) > 3 else parts[:1])


def movement(before: dict[str, np.ndarray], after: dict[str, np.ndarray]) -> list[dict]:
    """Per module: parameters, squared change, its share of the total and its change per parameter, densest
    first."""
    modules: dict[str, list[float]] = {}
    for name, w0 in before.items():
        change = float(((after[name].astype(np.float64) - w0) ** 2).sum())
        entry = modules.setdefault(module_of(name), [0, 0.0])
        entry[0] += int(w0.size)
        entry[1] += change
    total = sum(c for _, c in modules.values()) or 1.0
    rows = [{"module": m, "parameters": n, "squared_change": c, "share": c / total, "density": c / n}
            for m, (n, c) in modules.items()]
    return sorted(rows, key=lambda r: -r["density"])


def choose(rows: list[dict], share: float) -> list[str]:
    """The densest modules until they hold `share` of the total squared change."""
    chosen, held = [], 0.0
    for r in rows:
        if held >= share:
            break
        chosen.append(r["module"])
        held += r["share"]
    return chosen


def fine_tune(store: Path, out: Path, steps: dict[str, int], lr: float, foundation: Path) -> Path:
    """Non-private fine-tuning of the IBE and the twin stage from the foundation (frozen VAE), as
    `ecgtwin train --foundation` does."""
    from ecgtwin.config import load_config
    from ecgtwin.train.centralised import train_stage

    config = load_config(CONFIG)
    config.vae.trainable = "frozen"
    for stage in STAGES:
        settings = config.stage(stage)
        settings.steps, settings.lr, settings.trainable = steps[stage], lr, "all"
        train_stage(stage, config, store, out, progress=True, foundation=foundation)
    return out


def run(store: Path, out: Path, steps: dict[str, int], lr: float, share: float, foundation: Path) -> dict:
    from safetensors.numpy import load_file

    started = time.perf_counter()
    checkpoint = fine_tune(store, out / "fine-tuned", steps, lr, foundation)
    stages = {}
    for stage in STAGES:
        before = load_file(str(foundation / f"{stage}.safetensors"))
        rows = movement(before, load_file(str(checkpoint / f"{stage}.safetensors")))
        chosen = choose(rows, share)
        held = [r for r in rows if r["module"] in chosen]
        stages[stage] = {"steps": steps[stage], "modules": rows, "chosen": chosen,
                         "chosen_parameters": sum(r["parameters"] for r in held),
                         "all_parameters": sum(r["parameters"] for r in rows),
                         "chosen_share": sum(r["share"] for r in held)}
        print(stage, chosen, file=sys.stderr, flush=True)
    return {"store": str(store), "foundation": str(foundation), "lr": lr, "share": share, "stages": stages,
            "machine": {"machine": platform.machine(), "python": platform.python_version()},
            "wall_s": round(time.perf_counter() - started, 1)}


def chosen_modules(stage: str, data: Path = DATA) -> list[str]:
    """The modules the recorded measurement chose for a stage (what `trainable: modules` rows train)."""
    if not data.is_file():
        raise SystemExit(f"{data}: no weight-movement measurement; run python -m bench.weight_movement --record")
    return json.loads(data.read_text())["stages"][stage]["chosen"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.weight_movement", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, required=True, help="a PUBLIC store (the bench's reference population)")
    parser.add_argument("--out", type=Path, default=Path("weight-movement"))
    parser.add_argument("--foundation", type=Path, default=FOUNDATION)
    parser.add_argument("--ibe-steps", type=int, default=100)
    parser.add_argument("--twin-steps", type=int, default=400)
    parser.add_argument("--lr", type=float, default=2e-4, help="the privacy-utility rows' fine-tuning rate")
    parser.add_argument("--share", type=float, default=0.6, help="share of the total squared change to hold")
    parser.add_argument("--record", action="store_true", help=f"write {DATA.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if not 0 < args.share <= 1:
        parser.error("--share must be in (0, 1]")
    result = run(args.store, args.out, {"ibe": args.ibe_steps, "twin": args.twin_steps}, args.lr, args.share,
                 args.foundation)
    if args.record:
        from bench.tables import _provenance

        command = " ".join(["python -m bench.weight_movement", *(argv if argv is not None else sys.argv[1:])])
        DATA.write_text(json.dumps({"provenance": _provenance(command), **result}, indent=1) + "\n")
    summary = {s: {k: v for k, v in e.items() if k != "modules"} for s, e in result["stages"].items()}
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
