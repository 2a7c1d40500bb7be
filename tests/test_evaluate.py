"""The evaluation benchmark: every metric on constructed cases with known answers, refusal of mismatched
inputs, and a short `ecgtwin evaluate` end to end on a tiny trained checkpoint (about a minute)."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ecgtwin.cli import main
from ecgtwin.data.record import LEADS
from ecgtwin.data.store import SiteStore
from ecgtwin.evaluate import metrics as M
from ecgtwin.evaluate.downstream import classification_scores, fit_head, predict

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
FOUNDATION = Path(__file__).resolve().parents[1] / "foundations" / "demo"
FS = 102.4
KEYS = ("fid", "precision", "recall", "f1", "clip_score", "hr_mae", "hr_mae_keep_reference", "vae_relative_error", "condition_accuracy", "per_condition",
        "similarity", "silhouette", "identification_top1", "identification_top5", "identification_ibe_top1",
        "identification_ibe_real_top1", "identification_person_top1", "identification_person_real_top1", "downstream", "sanity")


def clusters(n_patients: int, per: int, dim: int = 16, spread: float = 0.05, seed: int = 0):
    """Feature clusters, one per patient, around random unit directions."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_patients, dim))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    ids = np.repeat(np.arange(n_patients), per)
    return centres[ids] + spread * rng.normal(size=(len(ids), dim)), ids


def pulse_ecg(hr: float, fs: float = FS, n: int = 1024) -> np.ndarray:
    """A 12-lead pulse train at a known rate, consistent with Einthoven (II = I + III)."""
    t = np.arange(n) / fs
    beats = np.arange(0.3, n / fs, 60.0 / hr)
    qrs = sum(np.exp(-0.5 * ((t - b) / 0.012) ** 2) for b in beats)
    twave = sum(0.25 * np.exp(-0.5 * ((t - b - 0.3) / 0.05) ** 2) for b in beats)
    base = qrs + twave
    lead_i, lead_iii = 0.6 * base, 0.5 * base
    x = np.stack([lead_i, lead_i + lead_iii, lead_iii, -(2 * lead_i + lead_iii) / 2, (lead_i - lead_iii) / 2,
                  (lead_i + 2 * lead_iii) / 2, *[(0.3 + 0.15 * k) * base for k in range(6)]])
    return x.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# feature metrics


def test_identical_sets_give_fid_zero_and_full_precision_recall():
    x, _ = clusters(10, 5, dim=16)
    assert M.fid(x, x) == pytest.approx(0.0, abs=1e-6)
    pr = M.precision_recall(x, x, k=3)
    assert pr["precision"] == pr["recall"] == pr["f1"] == 1.0
    many, _ = clusters(3, 4, dim=64)  # fewer samples than dimensions: singular covariances
    assert M.fid(many, many) == pytest.approx(0.0, abs=1e-4)


def test_disjoint_clusters_give_zero_precision_recall_and_fid_of_the_shift():
    x, _ = clusters(10, 5, dim=8)
    shift = np.full(8, 50.0)
    pr = M.precision_recall(x, x + shift, k=3)
    assert pr["precision"] == pr["recall"] == pr["f1"] == 0.0
    # same covariance, means apart by |shift|: FID is exactly |shift|^2
    assert M.fid(x, x + shift) == pytest.approx(float(shift @ shift), rel=1e-6)


def test_half_of_the_generated_set_off_the_manifold_gives_precision_one_half():
    real, _ = clusters(10, 6, dim=8)
    fake = np.concatenate([real[:30], real[:30] + 100.0])
    assert M.precision_recall(real, fake, k=3)["precision"] == 0.5


def test_similarity_silhouette_identification_with_known_answers():
    real, real_ids = clusters(20, 4, seed=1)
    twins, twin_ids = clusters(20, 4, seed=1)
    twins = twins + 0.02 * np.random.default_rng(2).normal(size=twins.shape)
    assert M.similarity_score(twins, twin_ids, real, real_ids) > 0.8
    assert M.silhouette(twins, twin_ids) > 0.8
    shuffled = np.random.default_rng(3).permutation(twin_ids)
    assert abs(M.similarity_score(twins, shuffled, real, real_ids)) < 0.1
    assert M.silhouette(twins, shuffled) < 0.0  # groups of strangers are not clusters
    ident = M.identification(real.copy(), real_ids, real, real_ids)  # identical copies
    assert ident["identification_top1"] == ident["identification_top5"] == 1.0
    assert ident["identification_chance_top1"] == pytest.approx(1 / 20)
    shuffled_ident = M.identification(twins, shuffled, real, real_ids)
    assert shuffled_ident["identification_top1"] < 0.2
    # real ECGs against the other real ECGs (never themselves): a patient's four ECGs are close here
    assert M.identification_real(real, real_ids)["identification_real_top1"] == 1.0
    assert M.identification_real(real, shuffled)["identification_real_top1"] < 0.2
    singles = M.identification_real(real[::4], real_ids[::4])  # nobody has a second ECG: nothing to find
    assert singles["identification_real_top1"] is None
    # a twin's rank depends on the gallery alone: any subset of twins scores the mean of its ranks (what the
    # bootstrap resamples instead of ranking every draw again)
    noisy = twins + 0.3 * np.random.default_rng(4).normal(size=twins.shape)
    ranks = M.identification_ranks(noisy, twin_ids, real, real_ids)
    subset = np.random.default_rng(5).choice(len(noisy), size=50, replace=True)
    assert 0 < (ranks == 0).mean() < 1
    assert M.identification(noisy[subset], twin_ids[subset], real, real_ids)["identification_top1"] == \
        pytest.approx((ranks[subset] == 0).mean())
    assert M.identification(noisy[subset], twin_ids[subset], real, real_ids)["identification_top5"] == \
        pytest.approx((ranks[subset] < 5).mean())


def test_clip_score_and_condition_scores():
    x = np.random.default_rng(0).normal(size=(6, 5))
    assert M.clip_score(x, 3 * x) == pytest.approx(1.0)
    assert M.clip_score(x, -x) == pytest.approx(-1.0)
    requested = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    probs = np.array([[0.9, 0.1], [0.2, 0.1], [0.1, 0.8], [0.6, 0.9]])
    scores = M.condition_scores(requested, probs, ["NSR", "AF"])
    assert scores["condition_accuracy"] == pytest.approx(3 / 4)
    assert scores["condition_exact_match"] == pytest.approx(2 / 4)
    assert scores["per_condition"]["NSR"] == {"n": 2, "recognised": 0.5, "false_alarm": 0.5}
    assert scores["per_condition"]["AF"]["recognised"] == 1.0


def test_downstream_head_and_scores():
    x, ids = clusters(2, 30, dim=6, spread=0.2)
    y = np.stack([ids == 0, ids == 1], axis=1).astype(float)
    head = fit_head(x, y)
    scores = classification_scores(y, predict(head, x))
    assert scores["accuracy"] > 0.95 and scores["macro_f1"] > 0.95 and scores["auroc"] > 0.99
    flipped = fit_head(x, 1 - y, init=head, l2_to_init=0.0, steps=400)  # fine-tuning moves the head
    assert classification_scores(y, predict(flipped, x))["accuracy"] < 0.05


# ---------------------------------------------------------------------------------------------------------
# signal metrics


def test_hr_mae_of_ecgs_with_known_rate_is_small():
    rates = np.array([50.0, 65.0, 80.0, 100.0, 130.0])
    signals = M.SignalSet(np.stack([pulse_ecg(r) for r in rates]), FS, name="pulses")
    measured = M.measured_hr(signals)
    assert M.hr_mae(rates, measured)["hr_mae"] < 2.0
    assert M.hr_mae(rates + 20, measured)["hr_mae"] > 15.0
    sanity = M.sanity(signals, measured)
    assert sanity["share_rhythm_detected"] == 1.0
    assert sanity["einthoven_relative_residual"]["max"] < 1e-5
    flat = M.sanity(M.SignalSet(np.zeros((2, 12, 1024)), FS))
    assert flat["share_rhythm_detected"] == 0.0


def test_einthoven_residual_small_on_store_records_large_when_leads_swapped(tiny):
    from ecgtwin.data.store import SiteStore

    store = SiteStore(tiny["store"])
    x = np.asarray(store.signals[:8])
    assert M.einthoven_residual(M.SignalSet(x, store.fs)).max() < 0.02
    swapped = x.copy()
    ii, v2 = LEADS.index("II"), LEADS.index("V2")
    swapped[:, [ii, v2]] = swapped[:, [v2, ii]]
    assert M.einthoven_residual(M.SignalSet(swapped, store.fs)).min() > 0.3
    # the same record given with its leads in another order (and named so) is still consistent
    order = list(reversed(range(12)))
    assert M.einthoven_residual(M.SignalSet(x[:, order], store.fs, tuple(LEADS[i] for i in order))).max() < 0.02


# ---------------------------------------------------------------------------------------------------------
# refusals


def test_mismatched_inputs_are_refused_with_clear_errors():
    x = np.zeros((3, 12, 1024), np.float32)
    real = M.SignalSet(x, FS, name="real")
    with pytest.raises(ValueError, match="different lead sets"):
        M.check_compatible(real, M.SignalSet(x, FS, tuple(reversed(LEADS)), name="twins"))
    with pytest.raises(ValueError, match="different sampling rates: 102.4 Hz vs 500 Hz"):
        M.check_compatible(real, M.SignalSet(x, 500.0, name="twins"))
    with pytest.raises(ValueError, match="different lengths"):
        M.check_compatible(real, M.SignalSet(x[..., :512], FS, name="twins"))
    with pytest.raises(ValueError, match="empty set"):
        M.SignalSet(np.zeros((0, 12, 1024)), FS, name="twins")
    with pytest.raises(ValueError, match="lacks lead"):
        M.sanity(M.SignalSet(x[:, :8], FS, LEADS[:8]))
    with pytest.raises(ValueError, match="empty set"):
        M.fid(np.zeros((0, 4)), np.zeros((5, 4)))
    with pytest.raises(ValueError, match="differ in dimension"):
        M.precision_recall(np.zeros((5, 4)), np.zeros((5, 3)))
    with pytest.raises(ValueError, match="no real ECG of patient"):
        M.identification(np.ones((2, 3)), ["a", "z"], np.ones((2, 3)), ["a", "b"])
    with pytest.raises(ValueError, match="2 ECGs but 3 reports"):
        M.clip_score(np.ones((2, 3)), np.ones((3, 3)))


# ---------------------------------------------------------------------------------------------------------
# end to end on a tiny trained checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from ecgtwin.config import load_config
    from ecgtwin.data.prepare import prepare_store
    from ecgtwin.data.synthetic import synthesize_consortium
    from ecgtwin.train.centralised import train_stage

    root = tmp_path_factory.mktemp("evaluate")
    synthesize_consortium(root / "consortium", sites=1, patients_per_site=16, records_per_patient=3, seed=7,
                          progress=False)
    prepare_store("synthetic", root / "consortium", root / "store", on_reject=lambda r: None, progress=False)
    config = load_config(CONFIG)
    config.data.held_out_fraction = 0.5  # enough held-out patients for an encoder and for twins
    for stage, steps in (("vae", 3), ("ibe", 3), ("twin", 5)):
        settings = getattr(config, stage)
        settings.steps, settings.batch_size, settings.log_every, settings.checkpoint_every = steps, 4, 1, steps
        train_stage(stage, config, root / "store", root / "ckpt", progress=False)
    return {"root": root, "store": root / "store", "ckpt": root / "ckpt"}


def run_cli(*args: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(args))
    return code, out.getvalue(), err.getvalue()


def test_evaluate_end_to_end_writes_every_metric_and_the_report(tiny, tmp_path):
    out = tmp_path / "eval"
    code, stdout, stderr = run_cli("evaluate", "--checkpoint", str(tiny["ckpt"]), "--store", str(tiny["store"]),
                                   "--out", str(out), "--json", "--no-progress", "--twins-per-patient", "2",
                                   "--steps", "4", "--encoder-steps", "20", "--person-guidance", "3")
    assert code == 0, stderr
    metrics = json.loads((out / "metrics.json").read_text())
    assert json.loads(stdout)["fid"] == metrics["fid"]
    missing = [k for k in KEYS if k not in metrics]
    assert not missing, missing
    for key in ("fid", "precision", "recall", "f1", "clip_score", "similarity", "identification_top1"):
        assert isinstance(metrics[key], float), key
    assert metrics["fid"] >= 0 and 0 <= metrics["precision"] <= 1 and -1 <= metrics["clip_score"] <= 1
    assert set(metrics["downstream"]) >= {"none", "personalised", "non_personalised"}
    assert metrics["sanity"]["twins"]["n"] == metrics["setup"]["twins"] > 0
    # the generator derives the limb leads by default, so every twin keeps II = I + III
    assert metrics["sanity"]["twins"]["einthoven_relative_residual"]["max"] < 1e-4
    for key in ("fid", "clip_score", "hr_mae", "similarity", "identification_top1"):
        low, high = metrics["intervals"][key]
        assert low <= high, key
    setup = metrics["setup"]
    assert setup["guidance_person"] == 3.0
    assert setup["twin_patients"] >= 2 and setup["encoder_patients"] >= 1 and not setup["encoder_cached"]
    for name in ("report.html", "tsne_patient.png", "tsne_condition.png", "real_vs_twin_0.png"):
        assert (out / name).stat().st_size > 0, name
    assert "Per condition" in (out / "report.html").read_text()

    # the encoder was trained on patients the generator never trained on, and is reused when cached
    from ecgtwin.evaluate import run_evaluation

    again = run_evaluation(tiny["ckpt"], tiny["store"], out, twins_per_patient=1, steps=2, encoder_steps=20,
                           downstream=False, report=False, progress=False)
    assert again["setup"]["encoder_cached"] and again["downstream"] is None


def test_evaluate_refuses_bad_checkpoints_and_stores_with_one_line(tiny, tmp_path):
    partial = tmp_path / "partial"
    shutil.copytree(tiny["ckpt"], partial)
    (partial / "twin.safetensors").unlink()
    code, _, err = run_cli("evaluate", "--checkpoint", str(partial), "--store", str(tiny["store"]),
                           "--out", str(tmp_path / "o"))
    assert code == 1 and "no twin weights" in err and len(err.strip().splitlines()) == 1

    other_rate = tmp_path / "store250"
    shutil.copytree(tiny["store"], other_rate)
    manifest = json.loads((other_rate / "manifest.json").read_text())
    manifest["representation"]["fs"] = 250.0
    (other_rate / "manifest.json").write_text(json.dumps(manifest))
    code, _, err = run_cli("evaluate", "--checkpoint", str(tiny["ckpt"]), "--store", str(other_rate),
                           "--out", str(tmp_path / "o"))
    assert code == 1 and "250 Hz" in err and len(err.strip().splitlines()) == 1

    code, _, err = run_cli("evaluate", "--checkpoint", str(tmp_path / "nowhere"), "--store", str(tiny["store"]),
                           "--out", str(tmp_path / "o"))
    assert code == 1 and "does not exist" in err
    code, _, err = run_cli("evaluate", "--checkpoint", str(tiny["ckpt"]), "--store", str(tiny["store"]),
                           "--out", str(tmp_path / "o"), "--twins-per-patient", "0")
    assert code == 1 and "at least 1" in err


def test_raw_limb_leads_of_the_decoder_break_einthoven_and_derived_ones_do_not(tiny):
    from ecgtwin.twin import Condition, TwinGenerator, reference_from_store

    generator = TwinGenerator(tiny["ckpt"])
    reference = reference_from_store(SiteStore(tiny["store"]), 0)
    condition = Condition("Sinus rhythm. Normal ECG.", 70.0)
    residual = {}
    for mode in ("raw", "derived"):
        generator.config.generate.limb_leads = mode
        twins = generator.generate(reference, condition, n=2, steps=2, seed=1)
        residual[mode] = M.einthoven_residual(M.SignalSet(twins, SiteStore(tiny["store"]).fs)).min()
    assert residual["raw"] > 0.05 and residual["derived"] < 1e-4, residual

    # the downstream panel samples its own batch: its twins pass through the same decoder step
    from ecgtwin.evaluate.downstream import panel_twins

    panel = [{"report": "Sinus rhythm. Normal ECG.", "hr": 70.0}, {"report": "Atrial fibrillation.", "hr": 110.0}]
    twins = panel_twins(generator, reference, panel, 2, None, 2, None, seed=1)
    assert M.einthoven_residual(M.SignalSet(twins, SiteStore(tiny["store"]).fs)).max() < 1e-4


def test_patients_with_one_ecg_train_the_encoder_and_never_get_twins():
    from ecgtwin.config import load_config
    from ecgtwin.evaluate.run import choose_patients, held_out_patients

    class Store:  # the two questions choose_patients asks of a site store
        path = Path("store")
        patients = [f"p{i:03d}" for i in range(200)]

        def records_of(self, patient):
            return np.arange(1 if int(patient[1:]) % 2 else 3)  # odd ids: a single ECG

    config = load_config(CONFIG)
    config.data.held_out_fraction = 0.5
    store = Store()
    held = held_out_patients(store, config)
    encoder, twins = choose_patients(store, config, 0.5, None, None)
    assert twins and all(len(store.records_of(p)) >= 2 for p in twins)
    assert set(encoder) | set(twins) == set(held) and not set(encoder) & set(twins)
    singles = [p for p in held if len(store.records_of(p)) == 1]
    assert singles and set(singles) <= set(encoder)


def test_patient_bootstrap_interval_of_a_mean_has_the_normal_width():
    from ecgtwin.evaluate.bootstrap import patient_bootstrap, rows_of

    rng = np.random.default_rng(0)
    patients = np.repeat(np.arange(100), 3)  # three twins per patient, sharing the patient's value
    values = np.repeat(rng.normal(0, 1, 100), 3)
    interval = patient_bootstrap(lambda s: {"mean": values[rows_of(s, patients)].mean()}, patients, draws=400)
    low, high = interval["mean"]
    assert low < values.mean() < high
    # patients, not twins, are the unit: the width is that of 100 draws (2 x 1.96 / 10), not of 300
    assert 0.3 < high - low < 0.48, high - low
    flat = patient_bootstrap(lambda s: {"same": 1.0}, patients, draws=20)
    assert flat["same"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="at least 2 patients"):
        patient_bootstrap(lambda s: {}, np.zeros(5))


def test_at_most_n_twin_patients_are_a_seeded_draw_from_all_held_out_patients(tiny):
    """A consortium's pooled store lists its sites in turn: the first N held-out patients would all be one
    site's. --max-patients draws N from all of them, the same N every time."""
    from ecgtwin.config import load_config
    from ecgtwin.data.store import SiteStore
    from ecgtwin.errors import UserError
    from ecgtwin.evaluate.run import choose_patients

    store, config = SiteStore(tiny["store"]), load_config(tiny["ckpt"] / "config.yaml")
    _, every = choose_patients(store, config, 0.5, store, None)
    _, some = choose_patients(store, config, 0.5, store, 3)
    assert len(some) == 3 and set(some) <= set(every) and some != every[:3]
    assert some == sorted(some, key=every.index) == choose_patients(store, config, 0.5, store, 3)[1]
    with pytest.raises(UserError, match="need 2 or more"):
        choose_patients(store, config, 0.5, store, 1)


def test_identification_in_the_person_space_finds_a_patients_own_ecg_and_not_anothers(tiny):
    """Known answers for the IBE-space identification: "twins" that are real later ECGs of the patients (under
    their own condition, as a twin is asked for) are each nearest their own ECG in the gallery; the same
    signals attributed to the wrong patients are identified as the patients they really are."""
    from ecgtwin.evaluate.run import TwinSet, person_identification
    from ecgtwin.twin import TwinGenerator

    generator, store = TwinGenerator(FOUNDATION), SiteStore(tiny["store"])  # a trained, public IBE
    patients = [p for p in store.patients if len(store.records_of(p)) >= 2][:12]
    targets = np.array([store.records_of(p)[1] for p in patients])
    gallery = np.concatenate([store.records_of(p) for p in patients])
    real = np.asarray(store.signals[gallery])
    gallery_patients = store.records.patient_id.to_numpy()[gallery]

    def twins(signal_rows: np.ndarray) -> TwinSet:
        n = len(patients)
        return TwinSet(np.asarray(store.signals[signal_rows]), np.array(patients), np.zeros(n, int), targets,
                       [""] * n, np.full(n, np.nan), ["{}"] * n)

    own = person_identification(generator, store, twins(targets), gallery, real, gallery_patients)
    assert own["identification_ibe_top1"] == 1.0
    assert 0.0 <= own["identification_ibe_real_top1"] <= 1.0
    shifted = person_identification(generator, store, twins(np.roll(targets, 1)), gallery, real, gallery_patients)
    assert shifted["identification_ibe_top1"] <= 1 / 3


def test_the_person_encoder_learns_to_tell_patients_it_never_saw_apart(tmp_path):
    """Trained on some patients' repeated ECGs, the person encoder re-identifies OTHER patients' ECGs (leave
    one out) far above chance and above the same net untrained; a "twin" that is a patient's own real ECG
    is identified as that patient, the same ECGs attributed to other patients are not."""
    from ecgtwin.data.prepare import prepare_store
    from ecgtwin.data.synthetic import synthesize_consortium
    from ecgtwin.evaluate.person_encoder import PersonEncoderConfig, get_person_encoder, train_person_encoder
    from ecgtwin.evaluate.run import independent_identification

    synthesize_consortium(tmp_path / "c", sites=1, patients_per_site=48, records_per_patient=3, seed=11, progress=False)
    prepare_store("synthetic", tmp_path / "c", tmp_path / "s", on_reject=lambda r: None, progress=False)
    store = SiteStore(tmp_path / "s")
    patients = sorted(store.patients)
    train = np.concatenate([store.records_of(p) for p in patients[:32]])
    test = np.concatenate([store.records_of(p) for p in patients[32:]])
    ids = store.records.patient_id.to_numpy()[test]
    real = M.SignalSet(np.asarray(store.signals[test]), store.fs, LEADS, "real")

    config = PersonEncoderConfig(steps=40, patients_per_batch=16)
    trained = get_person_encoder(store, train, config, tmp_path / "cache")
    untrained = train_person_encoder(store, train, dataclasses.replace(config, steps=1))
    assert trained.info["final_loss"] < trained.info["first_loss"]
    rate = lambda enc: M.identification_real(enc.features(real.signals, store.fs), ids)["identification_real_top1"]  # noqa: E731
    chance = 1 / len(patients[32:])
    assert rate(trained) >= max(4 * chance, rate(untrained) + 0.1), (rate(trained), rate(untrained))
    cached = get_person_encoder(store, train, config, tmp_path / "cache")
    assert np.allclose(cached.features(real.signals[:3], store.fs), trained.features(real.signals[:3], store.fs))

    later = np.array([store.records_of(p)[1] for p in patients[32:]])
    twins = M.SignalSet(np.asarray(store.signals[later]), store.fs, LEADS, "twins")
    own = independent_identification(trained, twins, real, np.array(patients[32:]), ids)
    assert own["identification_person_top1"] == 1.0  # its own ECG is in the gallery
    wrong = independent_identification(trained, twins, real, np.roll(np.array(patients[32:]), 1), ids)
    assert wrong["identification_person_top1"] <= 0.25
    assert train_person_encoder(store, np.array([train[0], train[3]]), config) is None  # one ECG per patient
