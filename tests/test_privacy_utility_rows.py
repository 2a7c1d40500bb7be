"""bench.privacy_utility's row bookkeeping: which rows share a model, and which rows the regimes compare."""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is not installed
from bench.privacy_utility import Row, regimes  # noqa: E402


def test_rows_that_differ_only_in_guidance_share_one_model():
    default, strong = Row(patients_per_site=2000), Row(patients_per_site=2000, guidance=4.0)
    assert strong.name == default.name + "-g4" and strong.model_name == default.name
    person = Row(patients_per_site=2000, guidance=4.0, guidance_person=8.0)
    assert person.name == default.name + "-g4-p8" and person.model_name == default.name
    assert Row(patients_per_site=2000, batch_patients=128).model_name == default.name + "-b128"
    assert Row(patients_per_site=2000, trainable="lora", finetune_lr=2e-3).name == \
        "n2000-eps8-foundation-vaefrozen-lora-lr0.002"
    assert Row(patients_per_site=2000, noise_draws=2).model_name == default.name + "-m2"
    assert Row(data="ptbxl", batch_patients=8, public="real").name == "ptbxl-eps8-foundation-vaefrozen-all-pubreal"
    # distributed DP: the same DP steps, one SecAgg+ round each
    distributed = Row(patients_per_site=2000, distributed=True)
    assert distributed.model_name == default.name + "-dist"
    assert distributed.plan()[:2] == ((0, 40, 240), (1, 1, 1)) and default.plan()[:2] == ((0, 1, 2), (1, 40, 120))
    assert Row(patients_per_site=2000, sites=10).model_name == default.name + "-10sites"
    assert Row(patients_per_site=2000, max_grad_norm=0.3).model_name == default.name + "-c0.3"


def test_a_frozen_ibe_row_plans_no_ibe_release_and_gives_its_budget_share_to_the_twin_stage():
    from bench.tables import recipe

    frozen = Row(patients_per_site=2000, ibe="frozen")
    assert frozen.model_name == Row(patients_per_site=2000).model_name + "-ibefrozen"
    assert frozen.plan() == ((0, 0, 2), (1, 40, 120), (None, None, 1.0))
    rounds, _, fractions = Row(patients_per_site=200, vae="dp", ibe="frozen").plan()  # VAE 0.2, twin 0.56 of 0.76
    assert rounds == (1, 0, 2) and fractions[1] is None and abs(sum(fractions[::2]) - 1) < 1e-12
    assert abs(fractions[0] / fractions[2] - 0.2 / 0.56) < 1e-12
    assert Row(patients_per_site=2000, ibe="frozen", distributed=True).plan()[:2] == ((0, 0, 240), (1, 1, 1))
    assert recipe(__import__("dataclasses").asdict(frozen)) == "all, IBE frozen"


def test_a_row_with_another_clipping_norm_says_so_and_its_noise_norm_is_in_its_own_c():
    """The recipe column names C, and "twin noise norm / C" divides the recorded sigma C / E by the row's C."""
    import dataclasses

    from bench.tables import recipe, twin_parameters

    row = dataclasses.asdict(Row(patients_per_site=2000, max_grad_norm=0.3))
    assert recipe(row) == "all, C 0.3" and recipe(dataclasses.asdict(Row(patients_per_site=2000))) == "all"
    assert twin_parameters("all") == 245892 and twin_parameters("bias") == 3140


def entry(row: Row, fid: float, accuracy: float, noise: float | None) -> dict:
    import dataclasses

    return {"name": row.name, "row": dataclasses.asdict(row), "metrics": {"fid": fid, "condition_accuracy": accuracy},
            "noise_on_mean_update": {} if noise is None else {"twin": noise}}


def test_regimes_judge_a_dp_row_against_the_non_private_row_of_its_size_at_the_default_guidance(tmp_path):
    rows = [entry(Row(patients_per_site=2000, epsilon=None), 40.0, 0.66, None),
            entry(Row(patients_per_site=2000, epsilon=8.0, batch_patients=128), 50.0, 0.60, 0.008),  # works
            entry(Row(patients_per_site=2000, epsilon=8.0, guidance=4.0), 500.0, 0.1, 0.9),  # ignored: guidance
            entry(Row(patients_per_site=2000, epsilon=8.0, guidance_person=8.0), 500.0, 0.1, 0.9),  # and person's
            entry(Row(patients_per_site=50, epsilon=3.0), 130.0, 0.2, 0.5)]  # no non-private row at 50: skipped
    data = tmp_path / "pu.json"
    data.write_text(json.dumps({"rows": {r["name"]: r for r in rows}}))
    table = json.loads(regimes(data, tmp_path / "regimes.json").read_text())
    assert [(r["row"], r["verdict"]) for r in table["rows"]] == [("n2000-eps8-foundation-vaefrozen-all-b128", "works")]
    assert table["works_up_to"] == 0.008 and table["collapses_from"] is None


def test_the_guidance_figure_draws_each_model_evaluated_at_several_guidances(tmp_path):
    rows = [entry(Row(patients_per_site=2000, epsilon=None, guidance=g), 40.0 + g, 0.5 + g / 20, None)
            for g in (1.0, 2.0, 4.0)] + [entry(Row(patients_per_site=50, epsilon=None), 30.0, 0.6, None),
                                         entry(Row(patients_per_site=2000, epsilon=None, guidance_person=8.0),
                                               45.0, 0.6, None)]  # another person guidance: not on this curve
    for r in rows:
        r["metrics"]["hr_mae"], r["intervals"] = 7.0, {}
    data = tmp_path / "pu.json"
    data.write_text(json.dumps({"rows": {r["name"]: r for r in rows}}))
    from bench.privacy_utility import guidance_models, plot_guidance

    models = guidance_models(rows)
    assert list(models) == ["n2000-nonprivate-foundation-vaefrozen-all"] and len(models[list(models)[0]]) == 3
    png = plot_guidance(data, tmp_path / "guidance.png")
    assert png.stat().st_size > 10_000


def test_the_gap_closed_is_measured_from_the_public_foundation_to_non_private_fine_tuning():
    from bench.privacy_utility import gap_closed, unseen_code

    code = unseen_code()
    assert code == "LBBB"  # the public population's profile has no LBBB at all (ecgtwin/data/synthetic)
    public = entry(Row(patients_per_site=2000, epsilon=None, start="public-only"), 48.0, 0.60, None)
    best = entry(Row(patients_per_site=2000, epsilon=None), 40.0, 0.70, None)
    lora = entry(Row(patients_per_site=2000, epsilon=None, trainable="lora"), 10.0, 0.99, None)  # not the ceiling
    half = entry(Row(patients_per_site=2000, epsilon=8.0, batch_patients=128), 44.0, 0.62, 0.008)
    worse = entry(Row(patients_per_site=2000, epsilon=3.0), 52.0, 0.55, 0.02)
    guided = entry(Row(patients_per_site=2000, epsilon=8.0, guidance=4.0), 40.0, 0.70, 0.008)  # other sampling
    alone = entry(Row(patients_per_site=50, epsilon=8.0), 30.0, 0.5, 0.5)  # no references at 50: skipped
    public["per_condition"], best["per_condition"] = {code: 0.1, "AF": 0.9}, {code: 0.5, "AF": 0.8}
    half["per_condition"] = {code: 0.4, "AF": 0.85}
    # a row evaluated by an encoder trained again (other real-ECG figures) is compared with its own references
    other = entry(Row(patients_per_site=2000, epsilon=8.0, local_steps=(10, 30)), 41.0, 0.69, 0.01)
    other["real"] = {"condition_accuracy_real": 0.94}
    public_again = entry(Row(patients_per_site=2000, epsilon=None, start="public-only"), 50.0, 0.50, None)
    public_again["real"] = {"condition_accuracy_real": 0.94}
    # more sites are a lever measured against the 3-site references, never a reference themselves
    wider = entry(Row(patients_per_site=2000, epsilon=8.0, sites=10), 42.0, 0.65, 0.005)
    wider_best = entry(Row(patients_per_site=2000, epsilon=None, sites=10), 20.0, 0.9, None)
    shares = {g["name"]: g for g in gap_closed([public, lora, wider_best, best, half, worse, guided, alone, other,
                                                public_again, wider])}
    assert set(shares) == {half["name"], worse["name"], wider["name"]}  # `other`: a public reference, no ceiling
    assert abs(shares[wider["name"]]["fid_share"] - 0.75) < 1e-9
    got = shares[half["name"]]
    assert abs(got["fid_share"] - 0.5) < 1e-9 and abs(got["condition_accuracy_share"] - 0.2) < 1e-9
    assert abs(got["per_condition_share"][code] - 0.75) < 1e-9
    assert got["per_condition_share"]["AF"] is None  # non-private is no better than public on AF: no gap
    assert got["target"] == 0.5 and shares[worse["name"]]["target"] == 0.3
    assert shares[worse["name"]]["fid_share"] == -0.5 and shares[worse["name"]]["per_condition_share"] == {}


def test_a_row_measured_again_by_another_evaluation_encoder_keeps_the_first(tmp_path):
    """A wiped cache trains the evaluation encoder again: the older rows of the first encoder are compared
    only with references of that encoder, so recording a reference again must not delete them."""
    from bench.privacy_utility import record

    data = tmp_path / "pu.json"
    public = entry(Row(patients_per_site=2000, epsilon=None, start="public-only"), 48.0, 0.60, None)
    public["real"] = {"condition_accuracy_real": 0.943}
    again = {**public, "metrics": {"fid": 50.0, "condition_accuracy": 0.5}, "real": {"condition_accuracy_real": 0.95}}
    record(public, "python -m bench.privacy_utility --record", data)
    record(public, "python -m bench.privacy_utility --record", data)  # the same encoder: replaced
    assert list(json.loads(data.read_text())["rows"]) == [public["name"]]
    record(again, "python -m bench.privacy_utility --record", data)
    rows = json.loads(data.read_text())["rows"]
    assert rows[public["name"]]["metrics"]["fid"] == 50.0
    assert rows[f"{public['name']}@0.943"]["metrics"]["fid"] == 48.0


def test_a_distributed_row_runs_every_site_through_secagg_with_fedadam_at_the_rows_rate(tmp_path, monkeypatch):
    """bench.results.train_federated's distributed wiring: the run config the simulation gets (inspected,
    the simulation itself replaced by a recorder) turns on SecAgg+, FedAdam at the row's learning rate and
    every site in every round, and each site's policy splits the noise among the sites."""
    from bench.results import Scale, train_federated
    from ecgtwin.coordinator import launch
    from ecgtwin.data.prepare import prepare_store
    from ecgtwin.data.synthetic import synthesize_consortium
    from ecgtwin.privacy.policy import load_policy

    synthesize_consortium(tmp_path / "raw", sites=3, patients_per_site=4, records_per_patient=2, seed=3, progress=False)
    stores = {s: tmp_path / "stores" / s for s in ("site_a", "site_b", "site_c")}
    for site, store in stores.items():
        prepare_store("synthetic", tmp_path / "raw" / site, store, progress=False)
    seen = {}

    def recorder(run_config: dict, log: Path) -> dict:
        seen.update(run_config)
        return {"status": "finished"}

    monkeypatch.setattr(launch, "simulate", recorder)
    row = Row(patients_per_site=4, distributed=True, ibe="frozen", finetune_lr=3e-4)
    rounds, steps, fractions = row.plan()
    scale = Scale(sites=3, patients_per_site=4, rounds=rounds, local_steps=steps, budget_fractions=fractions)
    train_federated(tmp_path / "row", stores, scale, 8.0, distributed_sites=3, server_lr=row.finetune_lr)
    assert seen["secure-aggregation"] is True and seen["strategy"] == "fedadam"
    assert seen["min-nodes"] == 3 and seen["server-lr"] == 3e-4
    assert (seen["rounds-vae"], seen["rounds-ibe"], seen["rounds-twin"]) == rounds == (0, 0, 240)
    policy = load_policy(tmp_path / "row" / "sites" / "site_a" / "privacy.yaml")
    assert policy.distributed_sites == 3 and policy.stage("twin").local_steps == 1
