"""The device benchmark (`bench/gpu.sh` runs it on a GPU machine; `--device cpu` runs it anywhere):

    python -m bench.gpu --device cuda --out gpu-results      # writes gpu-results/gpu.json

Through the same device path as the commands (ecgtwin.device):
- training: seconds per step and samples/s of each stage, paper and demo configs, non-private (`ecgtwin
  train`'s loop) and DP-SGD (the site's private pass, hooks), and the DP / non-DP ratio;
- generation: twins/s of the paper configuration at 25 DPM-Solver++ steps, without and with guidance (one
  doubled batch), fp32.
Each figure is the median of a few repeats after a warm-up; the machine is in the JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
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


def training(config: ExperimentConfig, store: Path, device: torch.device, batch: int, steps: int) -> dict:
    """Non-private and DP seconds per step of each stage on `store` (earlier stages at initial weights)."""
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
    with tempfile.TemporaryDirectory() as tmp:
        for stage in STAGES:
            policy = PrivacyPolicy(site="bench", epsilon=1e6, delta=1e-6, population=len(site.patients), stages=plans)
            timings = {}
            for name, run in (("non_dp", lambda k: local_pass(stage, config, site, weights, k, device=device)),
                              ("dp", lambda k: private_pass(stage, config, site, weights, policy,
                                                            Ledger(Path(tmp) / f"{stage}.jsonl"), steps=k,
                                                            device=device))):
                run(1)  # warm-up
                seconds = []
                for k in (steps, 2 * steps):  # the difference leaves out each pass's set-up (latents, plan)
                    _sync(device)
                    started = time.perf_counter()
                    run(k)
                    _sync(device)
                    seconds.append(time.perf_counter() - started)
                timings[name] = max(seconds[1] - seconds[0], 1e-9) / steps
            out[stage] = {"step_s_non_dp": round(timings["non_dp"], 4), "step_s_dp": round(timings["dp"], 4),
                          "dp_over_non_dp": round(timings["dp"] / timings["non_dp"], 2), "batch": batch}
    return out


def generation(checkpoint: Path, store: Path, device: torch.device, n: int) -> dict:
    from ecgtwin.data.store import SiteStore
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store

    generator = TwinGenerator(checkpoint, device=device)
    reference = reference_from_store(SiteStore(store), 0)
    target = Condition("Sinus rhythm. Normal ECG.", 70.0, 50.0, "F")
    out = {}
    for name, guidance in (("no_guidance", 1.0), ("guidance_2", 2.0)):
        generator.config.generate.guidance_condition = guidance
        generator.generate(reference, target, n=min(n, 8), seed=0)  # warm-up
        _sync(device)
        started = time.perf_counter()
        generator.generate(reference, target, n=n, seed=1)
        _sync(device)
        out[name] = {"twins": n, "twins_per_s": round(n / (time.perf_counter() - started), 1)}
    return out


def run(device: torch.device, configs: list[str], batch: int, steps: int, twins: int) -> dict:
    from ecgtwin.checkpoint import Checkpoint
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
            result[f"training_{name}"] = training(config, root / "store", device, batch, steps)
            if name == "paper":  # generation speed is the model's, not the weights': initial weights will do
                checkpoint = Checkpoint(root / "paper-model")
                checkpoint.save_config(config)
                from ecgtwin.conditioning import NORMALIZER_FILE, PatientInfoNormalizer
                checkpoint.write_text(NORMALIZER_FILE, PatientInfoNormalizer().to_json())
                for stage in STAGES:
                    checkpoint.save_arrays(stage, initial_weights(stage, config))
                result["generation_paper_dpm25"] = generation(checkpoint.path, root / "store", device, twins)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--configs", default="demo,paper", help="comma-separated: demo, paper")
    parser.add_argument("--batch", type=int, default=64, help="patients per step")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per pass")
    parser.add_argument("--twins", type=int, default=512, help="twins per timed generation batch")
    parser.add_argument("--out", type=Path, default=Path("gpu-results"))
    args = parser.parse_args()
    result = run(resolve_device(args.device), args.configs.split(","), args.batch, args.steps, args.twins)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
