"""Records/s of `prepare` on PTB-XL at 100 and 500 Hz (1 and 2 workers) and of `synth`."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.synthetic import synthesize_consortium

SHARED = Path(os.environ.get("ECGTWIN_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def run(out: Path) -> dict:
    results: dict = {"prepare": {}, "synth": {}}
    with tempfile.TemporaryDirectory() as tmp:
        ptbxl = SHARED / "ptbxl"
        if ptbxl.is_dir():
            for rate in (100, 500):
                for workers in (1, 2):
                    summary = prepare_store("ptbxl", ptbxl, Path(tmp) / f"s{rate}", rate=rate, workers=workers,
                                            on_reject=lambda _: None)
                    kept = summary["records_kept"]
                    results["prepare"][f"ptbxl_{rate}hz_workers{workers}"] = {
                        "records_kept": kept, "seconds": summary["seconds"],
                        "records_per_s": round(kept / summary["seconds"], 1)}
        else:
            results["skipped"] = f"ptbxl: no PTB-XL at {ptbxl}"
        start = time.perf_counter()
        summary = synthesize_consortium(Path(tmp) / "synth", sites=3, patients_per_site=10, records_per_patient=3, seed=1)
        seconds = time.perf_counter() - start
        results["synth"] = {"records": summary["records"], "seconds": round(seconds, 2),
                            "records_per_s": round(summary["records"] / seconds, 1), "fs": 500, "duration_s": 10}
        start = time.perf_counter()
        prepared = prepare_store("synthetic", Path(tmp) / "synth", Path(tmp) / "synth_store", workers=1)
        results["prepare"]["synthetic_500hz_workers1"] = {
            "records_kept": prepared["records_kept"], "records_per_s": prepared["records_per_s"]}
    return results
