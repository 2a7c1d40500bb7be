"""Privacy per patient: the policy, the accountant against an independent one, budget planning and
enforcement across restarts, per-patient clipping measured on the gradients, and the IBE's DP
objective whose per-patient gradient does not depend on the other patients."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant
from opacus import GradSampleModule

from ecgtwin.cli import main
from ecgtwin.config import ConfigError, ExperimentConfig, load_config
from ecgtwin.data.prepare import prepare_store
from ecgtwin.data.store import SiteStore
from ecgtwin.data.synthetic import synthesize_consortium
from ecgtwin.models import IndividualBaseExtractor, info_nce
from ecgtwin.privacy import BudgetExceeded, Ledger, PlanError, PrivacyPolicy, epsilon_of, load_policy, plan_budget
from ecgtwin.privacy.policy import StagePlan, StagePlans
from ecgtwin.train import private
from ecgtwin.train.randomness import PatientRandomness
from ecgtwin.weights import build_module
from ecgtwin.config import STAGES
from ecgtwin.data.split import training_rows
from ecgtwin.train.losses import ibe_private_loss

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "demo.yaml"
SCHEDULES = [  # (noise multiplier, sampling rate, steps) per release: heterogeneous, as stages and rounds are
    [(1.1, 0.01, 1000)],
    [(1.1, 0.01, 1000), (0.8, 0.05, 300), (2.0, 0.2, 100)],
    [(0.9, 0.25, 40), (1.3, 0.25, 40), (1.3, 0.25, 40)],
]


@pytest.fixture(autouse=True)
def quiet():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("privacy")
    synthesize_consortium(root / "raw", sites=1, patients_per_site=12, records_per_patient=3, seed=11, fs=250.0)
    prepare_store("synthetic", root / "raw", root / "store", on_reject=lambda r: None)
    return root / "store"


def policy(**overrides) -> PrivacyPolicy:
    stages = overrides.pop("stages", StagePlans(vae=StagePlan(rounds=1, local_steps=3, batch_patients=4),
                                                ibe=StagePlan(rounds=1, local_steps=3, batch_patients=4),
                                                twin=StagePlan(rounds=1, local_steps=3, batch_patients=4)))
    settings = {"site": "test_site", "epsilon": 8.0, "delta": 1e-3, "accountant": "rdp", "seed": 0, "population": 12,
                **overrides}
    return PrivacyPolicy(stages=stages, **settings)


# -- the policy file -------------------------------------------------------------------------------

@pytest.mark.parametrize("text, message", [
    ("epsilon: 0\n", "epsilon: must be > 0"),
    ("epsilon: -3\n", "epsilon: must be > 0"),
    ("epsilon: 3\ndelta: 1.5\n", "delta: must be in (0, 1)"),
    ("epsilon: 3\naccountant: moments\n", "accountant: must be one of prv, rdp"),
    ("noise: 1.0\n", "noise: unknown key"),
    ("epsilon: 3\nstages: {vae: {rounds: 1, local_steps: 0}}\n", "stages.vae: local_steps: must be >= 1"),
    ("epsilon: 3\nstages: {vae: {budget_fraction: 0.7}, ibe: {budget_fraction: 0.7}}\n", "budget_fraction values sum to 1.4"),
])
def test_policy_errors_name_the_file_and_the_key(tmp_path, text, message):
    path = tmp_path / "privacy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_policy(path)
    assert str(path) in str(error.value) and message in str(error.value)


def test_delta_must_be_a_tenth_of_one_over_patients():
    with pytest.raises(ValueError, match=r"delta 0.01 must be <= 0.1/patients = 0.1/20 = 0.005"):
        plan_budget(policy(delta=0.01), n_patients=20, where="site")
    plan_budget(policy(delta=0.005), n_patients=20)  # fine
    with pytest.warns(UserWarning, match="max_delta_times_population 0.5 > 0.1"):
        loose = policy(delta=0.01, max_delta_times_population=0.5)
    plan_budget(loose, n_patients=20)  # the officer relaxed it, and was warned


@pytest.mark.parametrize("text, message", [
    ("epsilon: .inf\ndelta: 0.001\n", "epsilon: must be > 0 and finite, got inf"),
    ("epsilon: .nan\ndelta: 0.001\n", "epsilon: must be > 0 and finite, got nan"),
    ("epsilon: 3\ndelta: .nan\n", "delta: must be in (0, 1)"),
    ("private: false\nepsilon: 3\n", "private: false with epsilon 3"),
    ("delta: 0.001\n", "epsilon: required for a private site"),
    ("epsilon: 3\nepsilon: 9\n", "key 'epsilon' given twice"),
    ("", "privacy policy is empty"),
    ("epsilon: 3\nunit: visit\n", "unit: must be one of patient, record"),
])
def test_policies_that_would_mislead_are_refused(tmp_path, text, message):
    path = tmp_path / "privacy.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_policy(path)


def test_a_private_policy_file_may_not_fix_its_seed(tmp_path, monkeypatch):
    path = tmp_path / "privacy.yaml"
    path.write_text("epsilon: 3\nseed: 4\n")
    monkeypatch.delenv("ECGTWIN_ALLOW_TEST_SEED")
    with pytest.raises(ConfigError, match="seed: a fixed seed makes the DP noise repeatable"):
        load_policy(path)
    path.write_text("private: false\nseed: 4\n")
    assert load_policy(path).seed == 4  # a non-private site has no noise to repeat
    monkeypatch.setenv("ECGTWIN_ALLOW_TEST_SEED", "1")
    path.write_text("epsilon: 3\nseed: 4\n")
    assert load_policy(path).seed == 4


def test_the_sampling_rate_comes_from_the_public_population_not_the_store(store):
    """q = batch / population: the same noise whatever the private count (up to the population)."""
    from ecgtwin.privacy.plan import stage_noise

    pol = policy(population=40)
    assert stage_noise(pol, "vae", pol.population)[0] == pytest.approx(4 / 40)
    assert pol.declared_population(11) == 40
    with pytest.raises(ValueError, match="more training patients than the policy's population 40"):
        pol.declared_population(41)
    with pytest.raises(ValueError, match="population: required for DP training"):
        policy(population=None).declared_population(11)


def test_a_nan_epsilon_is_refused_by_the_ledger(tmp_path, monkeypatch):
    import ecgtwin.privacy.ledger as ledger_module

    monkeypatch.setattr(ledger_module, "epsilon_of", lambda *a, **k: float("nan"))
    ledger = Ledger(tmp_path / "ledger.jsonl")
    with pytest.raises(BudgetExceeded):
        ledger.charge(policy(), "vae", 1, 10, 0.1, 1.0, patients=10)
    assert ledger.entries() == []


# -- the accountant against an independent one -------------------------------------------------------

def independent_epsilon(schedule, delta: float, kind: str) -> float:
    """Google's dp-accounting: RDP (as Opacus' RDP) or privacy-loss distributions (as Opacus' PRV)."""
    accountant = (rdp_privacy_accountant.RdpAccountant() if kind == "rdp"
                  else pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4))
    for sigma, q, steps in schedule:
        accountant.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("kind", ["rdp", "prv"])
def test_epsilon_agrees_with_dp_accounting_within_5_percent(schedule, kind):
    ours = epsilon_of(schedule, 1e-5, kind)
    theirs = independent_epsilon(schedule, 1e-5, kind)
    assert ours == pytest.approx(theirs, rel=0.05), (ours, theirs)


def test_ledger_epsilon_is_the_composition_of_its_releases(tmp_path):
    ledger, pol = Ledger(tmp_path / "ledger.jsonl"), policy(epsilon=50.0)
    for i, (sigma, q, steps) in enumerate(SCHEDULES[1]):
        entry = ledger.charge(pol, "vae", i + 1, steps, q, sigma, patients=100)
    assert entry["epsilon"] == pytest.approx(independent_epsilon(SCHEDULES[1], pol.delta, "rdp"), rel=0.05)
    assert Ledger(tmp_path / "ledger.jsonl").spent(pol) == pytest.approx(entry["epsilon"])  # a new process


# -- planning ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_plan_spends_the_budget_over_all_stages(accountant):
    pol = policy(accountant=accountant, delta=1e-4, stages=StagePlans(
        vae=StagePlan(rounds=3, local_steps=20, batch_patients=16, budget_fraction=0.5),
        ibe=StagePlan(rounds=2, local_steps=10, batch_patients=16),
        twin=StagePlan(rounds=3, local_steps=40, batch_patients=16)))
    stages = plan_budget(pol, n_patients=200)
    assert [s.stage for s in stages] == ["vae", "ibe", "twin"]
    composed = independent_epsilon([s.mechanism() for s in stages], pol.delta, accountant)
    assert composed == pytest.approx(pol.epsilon, rel=0.05)
    assert composed <= pol.epsilon * 1.05
    assert stages[-1].epsilon_after == pytest.approx(pol.epsilon, rel=0.01)
    assert all(s.noise_multiplier > 0.3 for s in stages)


def test_plan_refuses_a_budget_it_cannot_meet():
    tiny = policy(epsilon=0.05, stages=StagePlans(twin=StagePlan(rounds=50, local_steps=100, batch_patients=32)))
    with pytest.raises(PlanError, match="too small for the planned steps"):
        plan_budget(tiny, n_patients=64)
    fixed = policy(stages=StagePlans(vae=StagePlan(rounds=10, local_steps=100, batch_patients=32,
                                                   noise_multiplier=0.5)))
    with pytest.raises(PlanError, match="alone spend epsilon"):
        plan_budget(fixed, n_patients=64)


def test_cli_privacy_plan(store, tmp_path, capsys):
    path = tmp_path / "privacy.yaml"
    path.write_text("site: a\nepsilon: 4\ndelta: 0.001\naccountant: rdp\npopulation: 12\n"
                    "stages: {vae: {rounds: 2, local_steps: 5, batch_patients: 4}, ibe: {rounds: 0}, "
                    "twin: {rounds: 1, local_steps: 5, batch_patients: 4}}\n")
    assert main(["privacy", "plan", "--policy", str(path), "--store", str(store), "--json"]) == 0
    import json
    report = json.loads(capsys.readouterr().out)
    assert [s["stage"] for s in report["stages"]] == ["vae", "twin"]
    assert report["expected_epsilon"] == pytest.approx(4.0, rel=0.01)
    assert report["population"] == 12 and report["unit"] == "patient"
    from ecgtwin.weights import parameter_count
    for stage in report["stages"]:  # what the budget buys, per stage
        assert stage["noise_on_mean_update"] == pytest.approx(
            stage["noise_multiplier"] * 1.0 / (stage["sample_rate"] * 12))
        assert stage["parameters"] == parameter_count(stage["stage"], ExperimentConfig()) > 0
        assert stage["noise_norm_over_clip"] == pytest.approx(  # the noise's norm in units of the clip norm
            stage["noise_on_mean_update"] * stage["parameters"] ** 0.5)
    path.write_text("epsilon: 4\ndelta: 0.5\npopulation: 12\n")
    assert main(["privacy", "plan", "--policy", str(path), "--store", str(store)]) == 1
    assert "delta 0.5 must be <= 0.1/patients" in capsys.readouterr().err


def test_the_plan_says_which_measured_regime_a_stages_noise_falls_in(tmp_path):
    """works / degrades / collapses from the measured table (bench/privacy_utility.py --regimes), for the twin
    stage whose measurements it holds; any other stage, or no table, is `not measured`."""
    import json

    from ecgtwin.privacy.reports import regime

    table = tmp_path / "regimes.json"
    table.write_text(json.dumps({"works_up_to": 0.05, "collapses_from": 0.5}))
    assert [regime("twin", x, table) for x in (0.01, 0.05, 0.2, 0.5, 3.0)] == \
        ["works", "works", "degrades", "collapses", "collapses"]
    assert regime("vae", 0.01, table) == "not measured"
    assert regime("twin", 0.01, tmp_path / "absent.json") == "not measured"


# -- per-patient gradients ---------------------------------------------------------------------------

def per_patient_grads(model, loss_of_rows) -> torch.Tensor:
    """Flattened per-patient gradients [U, P] via Opacus hooks + the grouping private.py uses."""
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="sum")
    losses, row_unit = loss_of_rows()
    losses.sum().backward()
    params = [p for p in model.parameters() if p.requires_grad]
    private.group_grad_samples(params, row_unit, int(row_unit.max()) + 1)
    out = torch.cat([p.grad_sample.flatten(1) for p in params], dim=1)
    gsm._close()
    for p in params:
        p.grad, p.grad_sample = None, None
    return out


def ibe_batch(b: int, m: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    config = load_config(CONFIG).model.ibe
    rows = lambda n: (torch.randn(n, config.latent_channels, config.n_tokens, generator=g),  # noqa: E731
                      torch.randn(n, 3, config.cond_dim, generator=g), torch.ones(n, 3, dtype=torch.bool))
    return rows(b), rows(b), rows(b * m)


def replace_patient(batch, j: int, seed: int):
    """The same batch with patient j's ECGs (and condition tokens) replaced by others."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for latents, tokens, mask in batch[:2]:
        latents, tokens = latents.clone(), tokens.clone()
        latents[j] = torch.randn(latents[j].shape, generator=g) * 3
        tokens[j] = torch.randn(tokens[j].shape, generator=g)
        out.append((latents, tokens, mask))
    return (*out, batch[2])


def test_ibe_dp_objective_per_patient_gradient_ignores_other_patients():
    torch.manual_seed(0)
    ibe = IndividualBaseExtractor(load_config(CONFIG).model.ibe)
    b, m = 4, 3
    batch = ibe_batch(b, m, seed=1)
    changed = replace_patient(batch, j=2, seed=2)

    def dp_loss(data):
        def rows():
            unit = torch.arange(b)
            return ibe_private_loss(ibe, *data, temperature=0.1), torch.cat([unit, unit, unit.repeat_interleave(m)])
        return rows

    before, after = per_patient_grads(ibe, dp_loss(batch)), per_patient_grads(ibe, dp_loss(changed))
    for i in (0, 1, 3):
        torch.testing.assert_close(after[i], before[i], rtol=1e-4, atol=1e-7)
    assert not torch.allclose(after[2], before[2], rtol=1e-3)  # patient 2 itself did change

    def nce_loss(data):  # the paper's InfoNCE: every patient is a negative of every other
        def rows():
            ref, tgt = data[0], data[1]
            base = ibe(torch.cat([ref[0], tgt[0]]), torch.cat([ref[1], tgt[1]]), torch.cat([ref[2], tgt[2]]))
            unit = torch.arange(b)
            return info_nce(base[:b], base[b:], 0.1)[None], torch.cat([unit, unit])
        return rows

    before, after = per_patient_grads(ibe, nce_loss(batch)), per_patient_grads(ibe, nce_loss(changed))
    moved = (after[0] - before[0]).norm() / before[0].norm()
    assert moved > 1e-2, "InfoNCE couples patients: this test must be able to tell"


@pytest.mark.parametrize("mode, records", [("hooks", 3), ("functorch", 3), ("ghost", 1)])
def test_clipping_bounds_each_patients_contribution(store, tmp_path, mode, records):
    """Remove patient j from a step (noise off): the update direction moves by exactly C / E, however
    many records patient j has and however extreme they are; per-record clipping would allow k * C."""
    config = load_config(CONFIG)
    pol = policy(max_grad_norm=0.01, records_per_patient=records, grad_sample_mode=mode)
    s = SiteStore(store)
    rows = training_rows(s, config.data.held_out_fraction, 0)
    extreme = np.array(s.signals[rows]) * 1.0
    units = private._units_by_patient(s, rows)
    j = 3  # last in the batch: the VAE's sampling noise of the others is then the same in both runs
    extreme[units[j][1]] *= 25.0  # an outlier patient

    def grads(picks) -> torch.Tensor:
        built = private._vae(config, s, rows, {}, pol, PatientRandomness.from_seed(0), None)
        built.unit_loss = _with_signals(built, config, extreme)
        with private.dp_step(built, pol, config.vae, expected_batch=4.0, sigma=0.0,
                             generator=torch.Generator().manual_seed(0)) as step:
            step(picks, 0)
            return torch.cat([p.grad.flatten() for p in built.module.parameters()])

    picks = [(units[u][0], units[u][1][:records]) for u in range(4)]
    with_j, without_j = grads(picks), grads(picks[:j] + picks[j + 1:])
    contribution = (with_j - without_j).norm().item() * 4.0  # times expected batch size E
    assert contribution == pytest.approx(pol.max_grad_norm, rel=1e-3)


def _with_signals(built, config, signals: np.ndarray):
    """The VAE stage's unit loss, on signals with an outlier patient."""
    from ecgtwin.models import kl_weight_at
    from ecgtwin.train.losses import vae_batch_loss

    x = torch.from_numpy(signals.astype(np.float32))
    latent = (config.model.vae.latent_channels, config.data.n_samples // 8)

    def unit_loss(picks, step):
        index, unit = private._flatten(picks)
        noise = torch.stack([torch.randn(latent, generator=torch.Generator().manual_seed(int(pid[1:]) * 100 + k))
                             for pid, items in picks for k in range(len(items))])  # each patient's own noise
        loss = vae_batch_loss(built.module, x[index], kl_weight_at(step, 100, 1e-4), noise=noise)
        return private._per_unit_mean(loss, unit, len(picks)), unit

    return unit_loss


# -- budget enforcement across stages and restarts ----------------------------------------------------

def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else ""


def test_all_stages_train_under_one_budget_and_a_pass_beyond_it_is_refused(store, tmp_path):
    config = load_config(CONFIG)
    pol, ledger, cache = policy(), Ledger(tmp_path / "site" / "ledger.jsonl"), tmp_path / "site" / "cache"
    weights, results = {}, []
    for stage in STAGES:  # each pass: weights in, weights and its ledger entry out
        result = private.private_pass(stage, config, SiteStore(store), weights, pol, ledger, round=1, cache_dir=cache)
        weights[stage] = result.weights
        results.append(result)
    spent = [r.summary["epsilon"] for r in results]
    assert spent == sorted(spent) and spent[-1] <= pol.epsilon
    assert spent[-1] == pytest.approx(pol.epsilon, rel=0.01)  # the plan spends the whole budget
    assert ledger.entries() == [r.entry for r in results]
    assert [e["stage"] for e in ledger.entries()] == list(STAGES)
    assert all(set(weights[s]) == set(build_module(s, config).state_dict()) for s in STAGES)
    assert all(len(r.log) == pol.stage(r.stage).local_steps for r in results)
    assert (cache / "public-negatives" / "manifest.json").is_file() and (cache / "plan_cache.json").is_file()

    # one round more than planned: refused, nothing trained, ledger unchanged, the inputs untouched
    ledger_before = digest(ledger.path)
    twin_before = {k: v.copy() for k, v in weights["twin"].items()}
    with pytest.raises(BudgetExceeded, match=r"spent epsilon (7\.9\d*|8\.000) of 8 .*asked twin round 2"):
        private.private_pass("twin", config, SiteStore(store), weights, pol, ledger, round=2, cache_dir=cache)
    assert digest(ledger.path) == ledger_before
    assert all(np.array_equal(weights["twin"][k], twin_before[k]) for k in twin_before)

    # a restarted process (a new Ledger on the same file) remembers, and refuses as well
    with pytest.raises(BudgetExceeded):
        private.private_pass("vae", config, SiteStore(store), weights, pol,
                             Ledger(tmp_path / "site" / "ledger.jsonl"), round=2, cache_dir=cache)
    assert digest(ledger.path) == ledger_before


def test_a_pass_removes_opacus_hooks_when_it_ends(store):
    """The module a DP step wrapped has no Opacus hooks or per-sample gradients left, also after an error."""
    config, pol = load_config(CONFIG), policy()
    s = SiteStore(store)
    rows = training_rows(s, config.data.held_out_fraction, config.data.split_seed)
    built = private._vae(config, s, rows, {}, pol, PatientRandomness.from_seed(0), None)

    def hooks() -> int:
        return sum(len(m._forward_hooks) + len(m._backward_hooks) + len(m._forward_pre_hooks)
                   for m in built.module.modules())

    clean = hooks()
    with private.dp_step(built, pol, config.vae, 4.0, 1.0, torch.Generator().manual_seed(0)) as step:
        assert hooks() > clean  # Opacus is wired in during the pass
        step([(pid, items[:1]) for pid, items in built.units[:2]], 0)
    assert hooks() == clean
    assert not any(hasattr(p, "grad_sample") and p.grad_sample is not None for p in built.module.parameters())
    with pytest.raises(RuntimeError, match="boom"):
        with private.dp_step(built, pol, config.vae, 4.0, 1.0, torch.Generator().manual_seed(0)):
            raise RuntimeError("boom")
    assert hooks() == clean


def test_one_split_for_every_stage_and_the_planner(store):
    """Stages with different seeds train on the same patients, and the planner counts exactly them."""
    from ecgtwin.privacy.reports import training_patients
    from ecgtwin.train.result import pass_rows

    config = load_config(CONFIG)
    config.data.held_out_fraction = 0.3
    config.vae.seed, config.ibe.seed, config.twin.seed = 1, 2, 3
    s = SiteStore(store)
    rows = pass_rows(s, config)
    patients = set(s.records.patient_id.to_numpy()[rows])
    assert 0 < len(patients) < len(s.patients)  # something is held out, or the test proves nothing
    assert training_patients(s, config) == len(patients)
    config.data.split_seed = 99
    assert set(s.records.patient_id.to_numpy()[pass_rows(s, config)]) != patients  # the seed is the split's


def test_cli_train_with_policy_and_ledger(store, tmp_path, capsys):
    site = tmp_path / "site"
    site.mkdir()
    (site / "privacy.yaml").write_text(
        "site: a\nepsilon: 3\ndelta: 0.001\naccountant: rdp\nseed: 0\npopulation: 12\n"
        "stages: {vae: {rounds: 2, local_steps: 2, batch_patients: 4}, ibe: {rounds: 0}, twin: {rounds: 0}}\n")
    args = ["train", "--config", str(CONFIG), "--stage", "vae", "--store", str(store), "--out", str(tmp_path / "c"),
            "--policy", str(site / "privacy.yaml"), "--no-progress"]
    assert main(args) == 0
    assert main(["privacy", "ledger", "--site", str(site)]) == 0
    out = capsys.readouterr().out
    assert out.count("vae round") == 2 and "epsilon=3.0" in out.replace("epsilon=2.99", "epsilon=3.0")
    assert (site / "state" / "ledger.png").stat().st_size > 10_000
    assert main(args) == 1  # the budget is spent: refused with the figures
    assert "privacy budget refused: spent epsilon" in capsys.readouterr().err


def test_damaged_ledger_is_refused_not_guessed(tmp_path):
    path = tmp_path / "ledger.jsonl"
    path.write_text('{"stage": "vae"}\nnot json\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        Ledger(path).spent(policy())


# -- the membership-inference audit -------------------------------------------------------------------

def test_audit_separates_an_overfit_model_from_a_dp_one(tmp_path):
    """Non-private training overfit on 16 patients is attackable; DP-SGD at epsilon 8 is near chance."""
    synthesize_consortium(tmp_path / "raw", sites=1, patients_per_site=32, records_per_patient=3, seed=5, fs=250.0)
    prepare_store("synthetic", tmp_path / "raw", tmp_path / "store", on_reject=lambda r: None)
    from ecgtwin.audit import membership_audit

    config = load_config(CONFIG)
    config.model.vae.base_channels = 8  # a smaller VAE: the same story at a quarter of the cost
    report = membership_audit(tmp_path / "store", config, tmp_path / "audit", epsilon=8.0,
                              steps=150, overfit_steps=500, progress=False)
    plain, dp = report["models"]["non_private"], report["models"]["dp"]
    assert report["members"] == 16 and report["epsilon"] <= 8.0
    assert plain["train_error"] < 0.6 * plain["test_error"]  # it did overfit
    assert plain["loss"]["auc"] >= 0.75, plain
    assert abs(dp["loss"]["auc"] - 0.5) <= 0.2, dp
    assert plain["loss"]["auc"] - dp["loss"]["auc"] >= 0.15
    assert (tmp_path / "audit" / "audit_roc.png").stat().st_size > 10_000


def test_fedprox_proximal_step_pulls_towards_the_global_weights(store, tmp_path):
    """With lr * mu = 1 the proximal step returns every weight to the round's start exactly; mu = 0 does not."""
    from ecgtwin.train.local import local_pass

    config = load_config(CONFIG)
    pol = policy(stages=StagePlans(vae=StagePlan(rounds=1, local_steps=2, batch_patients=4)))
    s, ledgers = SiteStore(store), iter(range(100))
    for name, run in (("plain", lambda w, mu: local_pass("vae", config, s, w, steps=2, proximal_mu=mu).weights),
                      ("dp", lambda w, mu: private.private_pass(
                          "vae", config, s, w, pol, Ledger(tmp_path / f"ledger{next(ledgers)}.jsonl"),
                          proximal_mu=mu).weights)):
        start = run({}, 0.0)
        for mu, same in ((0.0, False), (1.0 / config.vae.lr, True)):
            new = run({"vae": start}, mu)
            moved = max(float(np.abs(new[k] - start[k]).max()) for k in start)
            assert (moved < 1e-5) is same, (name, mu, moved)


# -- one patient's randomness and gradient never depend on another patient ------------------------------

@pytest.mark.parametrize("stage", STAGES)
def test_removing_one_patient_changes_no_other_patients_gradient(store, stage):
    """Per-patient gradients of a DP step with and without the FIRST patient of the batch: every other
    patient's gradient is identical (its sampling, records, VAE noise, diffusion draws, dropout, public
    negatives and reference ECG come from its own generator). The pre-fix code drew them by position."""
    from ecgtwin.train.randomness import PatientRandomness
    from ecgtwin.weights import initial_weights

    config = load_config(CONFIG)
    s = SiteStore(store)
    rows = training_rows(s, config.data.held_out_fraction, config.data.split_seed)
    frozen = {st: initial_weights(st, config) for st in STAGES[: STAGES.index(stage)]}
    rand = PatientRandomness.from_seed(3, "site", stage, 1)
    built = private._BUILDERS[stage](config, s, rows, frozen, policy(), rand, None)
    picks = [(pid, items[:1]) for pid, items in built.units[:4]]

    def grads(chosen) -> torch.Tensor:
        return per_patient_grads(built.module, lambda: built.unit_loss(chosen, 5))

    with_first, without_first = grads(picks), grads(picks[1:])
    # equal up to float reordering in a smaller batch (a shifted random draw moves them by O(1))
    moved = (without_first - with_first[1:]).norm(dim=1) / with_first[1:].norm(dim=1)
    assert moved.max() < 1e-4, moved
    # and the reference a twin-stage patient gets does not depend on who else is in the store
    if stage == "twin":
        fewer = s.records_of(s.patients[0])
        kept = np.setdiff1d(rows, fewer)
        a = private.stage_inputs.reference_rows(s, rows, lambda p: rand.numpy("reference", -1, p))
        b = private.stage_inputs.reference_rows(s, kept, lambda p: rand.numpy("reference", -1, p))
        assert np.array_equal(a[np.isin(rows, kept)], b)


def test_a_patient_whose_loss_is_infinite_does_not_poison_the_step(store, tmp_path):
    """One patient's records scaled to 1e30 (finite in float32, infinite once squared): the pass drops that
    patient from each step it is sampled in, the weights stay finite, and the site would send them."""
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(store, copy)
    signals = np.load(copy / "signals.npy")
    s = SiteStore(store)
    signals[s.records_of(s.patients[0])] = 1e30
    np.save(copy / "signals.npy", signals)
    config = load_config(CONFIG)
    config.data.held_out_fraction = 0.0
    pol = policy(epsilon=1e4, stages=StagePlans(vae=StagePlan(rounds=1, local_steps=3, batch_patients=12,
                                                              noise_multiplier=1.0)))  # q = 1
    result = private.private_pass("vae", config, SiteStore(copy), {}, pol, Ledger(tmp_path / "ledger.jsonl"))
    assert result.summary["non_finite_patients"] == 3  # sampled (q = 1) and dropped in each of the 3 steps
    assert all(np.isfinite(v).all() for v in result.weights.values())
    assert np.isfinite(result.summary["loss"])


@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_a_patient_whose_gradient_is_not_finite_is_dropped_in_every_mode(mode):
    """A finite loss can have a non-finite gradient (sqrt at 0: loss 0, gradient 0 x inf): such a patient is
    dropped from the step in every per-sample mode, ghost clipping too, and the weights stay finite."""
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3, bias=False)
    x = torch.randn(5, 4)
    x[2] = 0.0  # patient p2: output 0, sqrt's gradient infinite there

    def unit_loss(picks, step):
        rows = torch.tensor([int(pid[1:]) for pid, _ in picks])
        return module(x[rows]).pow(2).sum(1).sqrt(), torch.arange(len(picks))

    built = private.PrivateStage(module, [(f"p{i}", np.array([i])) for i in range(5)], unit_loss, one_row_per_unit=True)
    pol = policy(records_per_patient=1, grad_sample_mode=mode)
    settings = load_config(CONFIG).vae
    with private.dp_step(built, pol, settings, expected_batch=5.0, sigma=0.0,
                         generator=torch.Generator().manual_seed(0)) as step:
        loss, dropped = step([(f"p{i}", np.array([i])) for i in range(5)], 0)
    assert dropped == 1 and np.isfinite(loss)
    assert torch.isfinite(module.weight).all()


def test_a_store_without_patient_ids_needs_unit_record(challenge_root, tmp_path):
    """The Challenge databases carry no patient ids (one recording = one patient): DP training refuses to call
    that patient-level unless the policy says unit: record, and the ledger and plan then say so."""
    prepare_store("challenge", challenge_root, tmp_path / "store", on_reject=lambda r: None)
    s = SiteStore(tmp_path / "store")
    assert s.patient_ids_are_records
    config = load_config(CONFIG)
    one = StagePlans(vae=StagePlan(rounds=1, local_steps=1, batch_patients=4), ibe=StagePlan(rounds=0),
                     twin=StagePlan(rounds=0))
    patient_level = policy(population=len(s.patients), delta=1e-4, stages=one)
    with pytest.raises(ValueError, match="set unit: record"):
        private.private_pass("vae", config, s, {}, patient_level, Ledger(tmp_path / "a.jsonl"))
    assert not (tmp_path / "a.jsonl").exists()
    record_level = dataclasses.replace(patient_level, unit="record")
    result = private.private_pass("vae", config, s, {}, record_level, Ledger(tmp_path / "b.jsonl"))
    assert result.entry["unit"] == "record" and result.summary["unit"] == "record"


def test_a_store_with_patient_ids_is_patient_level(store):
    assert not SiteStore(store).patient_ids_are_records

# -- the canary audit: an empirical lower bound on epsilon ---------------------------------------------

def test_canary_lower_bound_is_exact_on_known_counts():
    """Against the binomial tail directly: 32 of 32 right at 95 % means p^32 = 0.05 at the bound."""
    from scipy.stats import binom

    from ecgtwin.canary import epsilon_lower_bound

    eps = epsilon_lower_bound(32, 32, 0.95)
    assert (1 / (1 + np.exp(-eps))) ** 32 == pytest.approx(0.05, rel=1e-3)
    eps = epsilon_lower_bound(27, 32, 0.95)
    assert binom.sf(26, 32, 1 / (1 + np.exp(-eps))) == pytest.approx(0.05, rel=1e-3)
    assert epsilon_lower_bound(16, 32) == 0.0 and epsilon_lower_bound(20, 32) == 0.0  # chance-level guessing


def test_canary_lower_bound_includes_the_delta_term():
    """Under (epsilon, delta)-DP the p-value is beta + 2 m delta alpha (Steinke et al. 2023, Cor. 5.4), computed
    here term by term from the binomial: at the returned bound it equals 1 - confidence, and the bound is
    below the pure-DP one (a larger delta explains more correct guesses)."""
    from scipy.stats import binom

    from ecgtwin.canary import epsilon_lower_bound

    def p_value(eps, v, r, m, delta):
        q = 1 / (1 + np.exp(-eps))
        alpha = max(sum(binom.pmf(v - j, r, q) for j in range(1, i + 1)) / i for i in range(1, v + 1))
        return binom.sf(v - 1, r, q) + 2 * m * delta * alpha

    for v, r, m, delta in ((30, 32, 64, 1e-4), (60, 64, 256, 1e-3), (27, 32, 64, 1e-5)):
        eps = epsilon_lower_bound(v, r, 0.95, delta=delta, canaries=m)
        assert p_value(eps, v, r, m, delta) == pytest.approx(0.05, rel=1e-3), (v, r, m, delta)
        assert 0 < eps < epsilon_lower_bound(v, r, 0.95)
    assert epsilon_lower_bound(32, 32, 0.95, delta=0.01, canaries=64) == 0.0  # 2 m delta alone is above 0.05


def test_canary_audit_bounds_the_noiseless_run_above_the_dp_run(tmp_path, capsys):
    """The CLI on a small site: without noise the canaries give themselves away (a positive lower bound);
    under DP-SGD at epsilon 8 the bound stays below the claim (and here at chance)."""
    synthesize_consortium(tmp_path / "raw", sites=1, patients_per_site=32, records_per_patient=2, seed=5,
                          fs=250.0, progress=False)
    prepare_store("synthetic", tmp_path / "raw", tmp_path / "store", on_reject=lambda r: None, progress=False)
    config = load_config(CONFIG)
    config.model.vae.base_channels = 8
    from ecgtwin.config import save_config
    save_config(config, tmp_path / "small.yaml")
    assert main(["privacy", "audit", "--method", "canary", "--store", str(tmp_path / "store"), "--out",
                 str(tmp_path / "audit"), "--config", str(tmp_path / "small.yaml"), "--canaries", "64",
                 "--steps", "500", "--epsilon", "8", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    dp, plain = report["runs"]["dp"], report["runs"]["non_private"]
    for key in ("epsilon_claimed", "epsilon_lower_bound", "confidence"):
        assert key in report
    print(f"canary audit: non-private {plain['correct']}/{plain['guesses']} -> {plain['epsilon_lower_bound']:.2f}; "
          f"DP {dp['correct']}/{dp['guesses']} -> {dp['epsilon_lower_bound']:.2f} (claimed {dp['epsilon_claimed']:.2f})")
    assert plain["epsilon_lower_bound"] > 1.0
    assert dp["epsilon_lower_bound"] < dp["epsilon_claimed"] <= 8.0
    assert plain["epsilon_lower_bound"] > dp["epsilon_lower_bound"]
    assert json.loads((tmp_path / "audit" / "audit.json").read_text())["method"] == "canary"
