"""The device benchmark (`bench/gpu.sh` runs it on a GPU machine; `--device cpu` runs it anywhere):

    python -m bench.gpu --device cuda --out gpu-results      # writes gpu-results/gpu.json

Through the same device path as the commands (ecgtwin.device):
- training: seconds per step of each stage, paper and demo configs, non-private (`ecgtwin train`'s loop)
  and DP-SGD (the site's private pass) in each Opacus mode the stage allows (hooks, functorch, ghost), the
  fastest mode and the DP / non-DP ratio, in each precision (fp32, bf16 autocast);
- generation: twins/s of the paper configuration at 25 DPM-Solver++ steps, without and with guidance (one
  doubled batch), in each precision.
Each figure is the median of a few repeats after a warm-up; the machine is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ecgtwin.config import STAGES, ExperimentConfig, load_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.device import resolve_device

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


GHOST_STAGES = ("vae", "twin")  # one forward row per patient (1 record, 1 noise draw): ghost clipping applies


def training(config: ExperimentConfig, store: Path, device: torch.device, batch: int, steps: int) -> dict:
    """Non-private and DP seconds per step of each stage on `store` (earlier stages at initial weights), DP in
    every Opacus mode the stage and the precision allow."""
    from ecgtwin.data.store import SiteStore
    from ecgtwin.privacy import Ledger, PrivacyPolicy
    from ecgtwin.privacy.policy import StagePlan, StagePlans
    from ecgtwin.train.local import local_pass
    from ecgtwin.train.private import private_pass
    from ecgtwin.weights import initial_weights

    site = SiteStore(store)
    weights = {s: initial_weights(s, config) for s in STAGES}
    for stage in STAGES:
        config.stage(stage).batch_size = batch
    plans = StagePlans(**{s: StagePlan(rounds=1, local_steps=steps, batch_patients=batch, noise_multiplier=1.0)
                          for s in STAGES})
    out = {}
    config.twin.noise_draws = 1
    with tempfile.TemporaryDirectory() as tmp:
        for stage in STAGES:
            modes = ["hooks", "functorch"] + (["ghost"] if stage in GHOST_STAGES and
                                              config.compute.precision == "fp32" else [])
            policies = {m: PrivacyPolicy(site="bench", epsilon=1e6, delta=1e-6, population=len(site.patients),
                                         stages=plans, records_per_patient=1, grad_sample_mode=m) for m in modes}
            runs = {"non_dp": lambda k: local_pass(stage, config, site, weights, k, device=device)}
            for m in modes:
                runs[f"dp_{m}"] = (lambda k, m=m: private_pass(stage, config, site, weights, policies[m],
                                                              Ledger(Path(tmp) / f"{stage}-{m}.jsonl"), steps=k,
                                                              device=device))
            timings = {}
            for name, run in runs.items():
                run(1)  # warm-up
                # each pass times its own loop (after its set-up: latents, plan), up to reading its losses back
                timings[name] = sorted(run(steps).summary["seconds"] / steps for _ in range(3))[1]
            fastest = min(modes, key=lambda m: timings[f"dp_{m}"])
            out[stage] = {"step_s_non_dp": round(timings["non_dp"], 4),
                          **{f"step_s_dp_{m}": round(timings[f"dp_{m}"], 4) for m in modes},
                          "fastest_dp_mode": fastest, "step_s_dp": round(timings[f"dp_{fastest}"], 4),
                          "dp_over_non_dp": round(timings[f"dp_{fastest}"] / timings["non_dp"], 2), "batch": batch}
    return out


def generation(checkpoint: Path, store: Path, device: torch.device, n: int, precision: str = "fp32",
               compile: bool = False) -> dict:
    """Twins/s of one batch of n, after a warm-up (of the same n when compiled: another batch size would
    compile again inside the timing)."""
    from ecgtwin.data.store import SiteStore
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store

    generator = TwinGenerator(checkpoint, device=device, precision=precision, compile=compile)
    reference = reference_from_store(SiteStore(store), 0)
    target = Condition("Sinus rhythm. Normal ECG.", 70.0, 50.0, "F")
    out = {}
    for name, guidance in (("no_guidance", 1.0), ("guidance_2", 2.0)):
        generator.config.generate.guidance_condition = guidance
        generator.generate(reference, target, n=n if compile else min(n, 8), seed=0)  # warm-up
        _sync(device)
        started = time.perf_counter()
        generator.generate(reference, target, n=n, seed=1)
        _sync(device)
        out[name] = {"twins": n, "twins_per_s": round(n / (time.perf_counter() - started), 1)}
    return out


def run(device: torch.device, configs: list[str], batch: int, steps: int, twins: int,
        precisions: list[str] = ("fp32",), compile: bool = False) -> dict:
    from ecgtwin.checkpoint import Checkpoint
    from ecgtwin.conditioning import ensure_population_normalizer
    from ecgtwin.data.preprocess import PreprocessConfig
    from ecgtwin.models import paper_config
    from ecgtwin.weights import initial_weights

    result = {"machine": {"machine": platform.machine(), "python": platform.python_version(),
                          "torch": torch.__version__, "device": str(device),
                          "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None}}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        synthesize_consortium(root / "raw", sites=1, patients_per_site=max(2 * batch, 16), records_per_patient=2, seed=3)
        prepare_store("synthetic", root / "raw" / "site_a", root / "store", config=PreprocessConfig(), progress=False)
        for name in configs:
            config = load_config(ROOT / "configs" / "demo.yaml")
            if name == "paper":
                config.model = paper_config()
            for precision in precisions:
                config.compute.precision = precision
                suffix = "" if precision == "fp32" else f"_{precision}"
                result[f"training_{name}{suffix}"] = training(config, root / "store", device, batch, steps)
        # generation speed is the model's, not the weights': the paper model at initial weights will do
        config = load_config(ROOT / "configs" / "demo.yaml")
        config.model = paper_config()
        checkpoint = Checkpoint(root / "paper-model")
        checkpoint.save_config(config)
        ensure_population_normalizer(checkpoint.path)
        for stage in STAGES:
            checkpoint.save_arrays(stage, initial_weights(stage, config))
        for precision in precisions:
            for compiled in (False, True) if compile else (False,):
                suffix = ("" if precision == "fp32" else f"_{precision}") + ("_compiled" if compiled else "")
                result[f"generation_paper_dpm25{suffix}"] = generation(checkpoint.path, root / "store", device,
                                                                       twins, precision, compiled)
    return result


def record_modes(kind: str, result: dict, command: str) -> Path:
    """Write what grad_sample_mode auto takes on this kind of device into ecgtwin/train/opacus_modes.json: per
    precision, each stage's fastest measured mode, from the largest configuration measured (paper, else demo)."""
    from bench.tables import _provenance
    from ecgtwin.train.private import MEASURED_MODES

    table = json.loads(MEASURED_MODES.read_text()) if MEASURED_MODES.is_file() else {}
    modes = {}
    for precision in ("fp32", "bf16"):
        suffix = "" if precision == "fp32" else f"_{precision}"
        measured = result.get(f"training_paper{suffix}") or result.get(f"training_demo{suffix}")
        if measured:
            modes[precision] = {stage: r["fastest_dp_mode"] for stage, r in measured.items()}
    table[kind] = {"provenance": _provenance(command), **modes}
    MEASURED_MODES.write_text(json.dumps(table, indent=2) + "\n")
    return MEASURED_MODES


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", default="demo,paper", help="comma-separated: demo, paper")
    parser.add_argument("--batch", type=int, default=64, help="patients per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per pass")
    parser.add_argument("--twins", type=int, default=512, help="twins per timed generation batch")
    parser.add_argument("--precisions", default="fp32,bf16", help="comma-separated: fp32, bf16")
    parser.add_argument("--compile", action="store_true",
                        help="also time generation with the denoiser under torch.compile (compute.compile)")
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    parser.add_argument("--record", action="store_true",
                        help="also write bench/data/benchmarks/device-<cpu|cuda>.json (then python -m bench.tables)")
    args = parser.parse_args()
    result = run(resolve_device(args.device), args.configs.split(","), args.batch, args.steps, args.twins,
                 args.precisions.split(","), args.compile)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    if args.record:
        from bench.tables import record_benchmark

        command = "python -m bench.gpu " + " ".join(sys.argv[1:])
        kind = resolve_device(args.device).type
        print(record_benchmark(f"device-{kind}", result, command))
        print(record_modes(kind, result, command))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
