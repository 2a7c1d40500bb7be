"""Differential privacy at a site: the policy, the persistent accountant (ledger), budget planning and
the membership-inference audit. The unit of privacy is the patient; see docs/privacy.md."""

from ecgtwin.privacy.ledger import BudgetExceeded, Ledger, epsilon_of
from ecgtwin.privacy.plan import PlanError, StageBudget, plan_budget, stage_noise
from ecgtwin.privacy.policy import PrivacyPolicy, StagePlan, load_policy

__all__ = ["BudgetExceeded", "Ledger", "epsilon_of", "PlanError", "StageBudget", "plan_budget", "stage_noise",
           "PrivacyPolicy", "StagePlan", "load_policy"]
