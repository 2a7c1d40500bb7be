"""The built-in synthetic consortium: simulated patients with persistent individual hearts,
recorded several times under known conditions, written as WFDB records per hospital site.

See docs/synthetic.md for the model and its limits.
"""

from ecgtwin.data.synthetic.conditions import CONDITIONS, RHYTHMS, ConditionPlan, check_conditions, machine_report
from ecgtwin.data.synthetic.consortium import (
    METADATA_COLUMNS,
    PUBLIC_PROFILE,
    SITE_PROFILES,
    SiteProfile,
    SyntheticECG,
    SyntheticPatient,
    draw_patient,
    plan_recording,
    simulate_ecg,
    site_name,
    synthesize_consortium,
)
from ecgtwin.data.synthetic.heart import HeartTraits, draw_acquisition, draw_heart_traits

__all__ = [
    "CONDITIONS",
    "METADATA_COLUMNS",
    "RHYTHMS",
    "PUBLIC_PROFILE",
    "SITE_PROFILES",
    "ConditionPlan",
    "HeartTraits",
    "SiteProfile",
    "SyntheticECG",
    "SyntheticPatient",
    "check_conditions",
    "draw_acquisition",
    "draw_heart_traits",
    "draw_patient",
    "machine_report",
    "plan_recording",
    "simulate_ecg",
    "site_name",
    "synthesize_consortium",
]
