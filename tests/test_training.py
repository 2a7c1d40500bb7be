"""Each stage trained briefly on a small synthetic store: losses fall, the VAE reconstructs held-out
patients, the IBE separates patients it never saw, generation is deterministic, resume is exact."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import wfdb
from safetensors.torch import load_file

from ecgtwin.checkpoint import Checkpoint
from ecgtwin.cli import main
from ecgtwin.conditioning import store_conditions
from ecgtwin.config import ConfigError, load_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.data.wfdb_io import read_wfdb
from ecgtwin.models import IndividualBaseExtractor
from ecgtwin.conditioning import load_conditioner
from ecgtwin.data.split import split_patients
from ecgtwin.train.centralised import train_stage
from ecgtwin.train.inputs import base_vectors, encode_latents
from ecgtwin.train.result import frozen_vae
from ecgtwin.weights import build_module

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
HELD_OUT = 0.2
VAE_CORRELATION_FLOOR = 0.6  # mean 12-lead Pearson r on held-out patients after 200 steps (measured 0.66-0.79; untrained ~0)


def short_config():
    config = load_config(CONFIG)
    config.data.held_out_fraction = HELD_OUT
    config.vae.steps, config.vae.lr, config.vae.log_every = 200, 2e-3, 5
    config.ibe.steps, config.ibe.lr, config.ibe.log_every = 100, 1e-3, 5
    config.twin.steps, config.twin.lr, config.twin.log_every = 150, 1e-3, 5
    return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    synthesize_consortium(root / "consortium", sites=2, patients_per_site=16, records_per_patient=3, seed=7)
    prepare_store("synthetic", root / "consortium", root / "store", on_reject=lambda r: None)
    config = short_config()
    summaries = {stage: train_stage(stage, config, root / "store", root / "ckpt", progress=False)
                 for stage in ("vae", "ibe", "twin")}
    return {"root": root, "store": root / "store", "ckpt": root / "ckpt", "config": config, "summaries": summaries}


def held_out_rows(store: SiteStore) -> np.ndarray:
    _, held = split_patients(store.patients, HELD_OUT, seed=0)
    assert len(held) >= 3, "the split must hold out some patients for this test to mean anything"
    return np.concatenate([store.records_of(p) for p in held])


def test_each_stage_loss_falls(trained):
    for stage in ("vae", "ibe", "twin"):
        losses = [json.loads(l)["loss"] for l in (trained["ckpt"] / f"{stage}_loss.jsonl").read_text().splitlines()]
        first, last = np.mean(losses[:3]), np.mean(losses[-3:])
        assert last < 0.6 * first, f"{stage}: loss {first:.4g} -> {last:.4g}"
        assert (trained["ckpt"] / f"{stage}_loss.png").stat().st_size > 1000


def test_vae_reconstructs_held_out_patients(trained):
    store = SiteStore(trained["store"])
    x = torch.from_numpy(np.asarray(store.signals[held_out_rows(store)]))
    vae = frozen_vae(trained["config"], Checkpoint(trained["ckpt"]).load_arrays("vae"))
    with torch.no_grad():
        x_hat = vae.decode(vae.encode(x)[0])
    # Pearson r of each record over all 12 leads (each lead centred): near-flat leads such as a
    # perpendicular aVL weigh by their amplitude, as they do to a reader of the ECG.
    xc, hc = (x - x.mean(-1, keepdim=True)).flatten(1), (x_hat - x_hat.mean(-1, keepdim=True)).flatten(1)
    r = (xc * hc).sum(-1) / (xc.norm(dim=-1) * hc.norm(dim=-1) + 1e-8)
    print(f"held-out reconstruction: mean r = {r.mean():.3f}, min {r.min():.3f} over {len(r)} records")
    assert r.mean() > VAE_CORRELATION_FLOOR


def identity_margin(ibe, latents, conditions, patient_ids):
    base = torch.nn.functional.normalize(base_vectors(ibe, latents, conditions), dim=-1)
    sim = (base @ base.T).numpy()
    same = (patient_ids[:, None] == patient_ids[None, :]) & ~np.eye(len(patient_ids), dtype=bool)
    return sim[same].mean() - sim[patient_ids[:, None] != patient_ids[None, :]].mean()


def test_ibe_separates_patients_it_never_saw(trained):
    store, checkpoint, config = SiteStore(trained["store"]), Checkpoint(trained["ckpt"]), trained["config"]
    rows = held_out_rows(store)
    latents = encode_latents(frozen_vae(config, checkpoint.load_arrays("vae")), store, rows)
    conditions = store_conditions(store.records.iloc[rows], load_conditioner(config, checkpoint.path))
    patients = store.records.patient_id.to_numpy()[rows]
    trained_margin = identity_margin(checkpoint.load_weights("ibe", IndividualBaseExtractor(config.model.ibe)),
                                     latents, conditions, patients)
    untrained_margin = identity_margin(build_module("ibe", config, seed=0), latents, conditions, patients)
    print(f"held-out cosine margin same-minus-other patient: trained {trained_margin:.3f}, untrained {untrained_margin:.3f}")
    assert trained_margin > 0.3 and trained_margin > untrained_margin + 0.2


class Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def ecgtwin(*args, check=True):
    """The command line in-process (the same entry point as the installed script, without a new interpreter)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    if check and code != 0:
        raise AssertionError(f"ecgtwin {' '.join(map(str, args))} failed: {err.getvalue()}")
    return Done(code, out.getvalue(), err.getvalue())


def test_generate_runs_as_a_separate_process(trained, tmp_path):
    reference = sorted((trained["root"] / "consortium").glob("*/*_01.hea"))[0].with_suffix("")
    done = subprocess.run([sys.executable, "-m", "ecgtwin.cli", "generate", "--checkpoint", str(trained["ckpt"]),
                           "--reference", str(reference), "-n", "1", "--steps", "4", "--json", "--no-progress",
                           "--out", str(tmp_path)], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout)["twins"][0]["record"] == "twin_000"


def test_generate_writes_deterministic_twins_on_ecg_paper(trained, tmp_path):
    reference = sorted((trained["root"] / "consortium").glob("*/*_01.hea"))[0].with_suffix("")
    common = ["generate", "--checkpoint", trained["ckpt"], "--reference", reference, "--report",
              "Atrial fibrillation", "--hr", "110", "-n", "2", "--steps", "8", "--guidance", "2", "--json", "--no-progress"]
    first = json.loads(ecgtwin(*common, "--out", tmp_path / "a").stdout)
    ecgtwin(*common, "--out", tmp_path / "b")
    ecgtwin(*common, "--seed", "1", "--out", tmp_path / "c")
    assert (tmp_path / "a/twin_000.dat").read_bytes() == (tmp_path / "b/twin_000.dat").read_bytes()
    assert (tmp_path / "a/twin_000.dat").read_bytes() != (tmp_path / "c/twin_000.dat").read_bytes()
    assert (tmp_path / "a/twin_000.dat").read_bytes() != (tmp_path / "a/twin_001.dat").read_bytes()
    header = wfdb.rdheader(str(tmp_path / "a/twin_000"))
    assert header.fs == 500 and header.sig_len == 5000 and header.units == ["mV"] * 12
    assert header.sig_name[3] == "aVR" and "Report: Atrial fibrillation" in header.comments
    assert any(c.startswith("HR: 110") for c in header.comments)
    assert (tmp_path / "a/twin.png").stat().st_size > 10_000
    assert first["twins"][0]["hr_requested"] == 110


def test_condition_editing_from_the_reference_report(trained, tmp_path):
    reference = sorted((trained["root"] / "consortium").glob("*/*_01.hea"))[0].with_suffix("")
    own = [c for c in read_wfdb(reference).comments if c.startswith("Report:")][0].removeprefix("Report: ")
    first_statement = own.split(". ")[0].rstrip(".")
    out = json.loads(ecgtwin("generate", "--checkpoint", trained["ckpt"], "--reference", reference, "--swap-statement",
                              f"{first_statement}=Atrial fibrillation", "--add-statement", "ST elevation", "-n", "1",
                              "--steps", "4", "--json", "--no-progress", "--out", tmp_path).stdout)
    assert out["target_report"].startswith("Atrial fibrillation") and out["target_report"].endswith("ST elevation")
    assert first_statement not in out["target_report"]


def test_generate_rejects_bad_inputs_with_one_line(trained, tmp_path):
    reference = sorted((trained["root"] / "consortium").glob("*/*_01.hea"))[0].with_suffix("")
    signal = read_wfdb(reference).signal
    wfdb.wrsamp("eight", fs=500, units=["mV"] * 8, sig_name=["I", "II", "V1", "V2", "V3", "V4", "V5", "V6"],
                p_signal=signal[[0, 1, 6, 7, 8, 9, 10, 11]].T.astype(float), fmt=["16"] * 8, adc_gain=[1000.0] * 8,
                baseline=[0] * 8, write_dir=str(tmp_path))
    cases = [
        (["--checkpoint", trained["ckpt"], "--reference", tmp_path / "eight"], "wrong_lead_count"),
        (["--checkpoint", tmp_path / "none", "--reference", reference], "does not exist"),
        (["--checkpoint", trained["ckpt"], "--reference", reference, "--hr", "900"], "not a plausible heart rate"),
        (["--checkpoint", trained["ckpt"], "--reference", reference, "--swap-statement", "Nothing=AF"], "cannot swap"),
        (["--checkpoint", trained["ckpt"], "--reference", tmp_path / "missing"], "does not exist"),
    ]
    for args, message in cases:
        done = ecgtwin("generate", *args, "--out", tmp_path / "out", "--no-progress", check=False)
        assert done.returncode == 1, done.stderr
        errors = [l for l in done.stderr.splitlines() if l.startswith("ecgtwin generate: error:")]
        assert len(errors) == 1 and message in errors[0] and "Traceback" not in done.stderr, done.stderr


def test_cohort_batch_mode(trained, tmp_path):
    out = json.loads(ecgtwin("cohort", "--checkpoint", trained["ckpt"], "--store", trained["store"], "--report",
                             "Sinus tachycardia", "--report", "Left bundle branch block", "--patients", "2", "-n", "1",
                             "--steps", "4", "--batch-size", "3", "--json", "--no-progress", "--out", tmp_path).stdout)
    assert out["twins"] == 2 * 2 * 1
    assert len(list(tmp_path.glob("*/arm*_000.hea"))) == 4 and (tmp_path / "cohort.csv").is_file()


def test_batched_generation_is_per_request_generation_in_fewer_passes(trained):
    """Many references x conditions per sampling batch: with one request per batch it is exactly
    `generate`; and a request's twins do not depend on the other requests that share its batch."""
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store

    generator = TwinGenerator(trained["ckpt"])
    store = SiteStore(trained["store"])
    refs = [reference_from_store(store, int(store.records_of(p)[0])) for p in store.patients[:3]]
    targets = [Condition("Sinus tachycardia", 120.0, 60.0, "F"), Condition("Sinus bradycardia", 50.0, 60.0, "M")]
    requests = [(refs[0], targets[0]), (refs[1], targets[1]), (refs[2], targets[0])]
    one_by_one = generator.generate_batch(requests, n=2, batch_size=2, steps=3, seed=5)
    for k, (reference, target) in enumerate(requests):
        np.testing.assert_allclose(one_by_one[k], generator.generate(reference, target, n=2, steps=3, seed=5 + k),
                                   atol=1e-5)
    together = generator.generate_batch(requests[:2], n=2, batch_size=4, steps=3, seed=9)
    other = generator.generate_batch([requests[0], requests[2]], n=2, batch_size=4, steps=3, seed=9)
    np.testing.assert_allclose(together[0], other[0], atol=1e-5)  # the same noise rows, other neighbours
    assert not np.allclose(together[1], other[1])  # another person: other twins
    assert [a.shape for a in together] == [(2, 12, store.signals.shape[-1])] * 2


def test_resume_after_interruption_is_exact(trained, tmp_path):
    config = short_config()
    config.vae.steps, config.vae.checkpoint_every, config.vae.log_every = 12, 5, 1

    def crash_at_8(step, _):
        if step == 8:
            raise KeyboardInterrupt

    train_stage("vae", config, trained["store"], tmp_path / "whole", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train_stage("vae", config, trained["store"], tmp_path / "resumed", progress=False, on_step=crash_at_8)
    summary = train_stage("vae", config, trained["store"], tmp_path / "resumed", progress=False)
    assert summary["resumed_from"] == 5
    whole, resumed = load_file(tmp_path / "whole/vae.safetensors"), load_file(tmp_path / "resumed/vae.safetensors")
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    assert (tmp_path / "whole/vae_loss.jsonl").read_text() == (tmp_path / "resumed/vae_loss.jsonl").read_text()


def test_stages_refuse_missing_prerequisites_and_foreign_checkpoints(trained, tmp_path):
    config = short_config()
    with pytest.raises(FileNotFoundError, match="no vae weights"):
        train_stage("ibe", config, trained["store"], tmp_path / "empty", progress=False)
    config.model.vae.base_channels = 8
    with pytest.raises(ConfigError, match="different model configuration"):
        train_stage("vae", config, trained["store"], trained["ckpt"], progress=False)



def test_export_refuses_a_checkpoint_with_a_site_fitted_normaliser(trained, tmp_path):
    """Centralised training fits HR/age statistics on the store: an un-noised statistic of its patients."""
    done = ecgtwin("export", "--checkpoint", trained["ckpt"], "--out", tmp_path / "bundle", check=False)
    assert done.returncode == 1 and "fitted on a site's patients" in done.stderr
    assert not (tmp_path / "bundle").exists()
