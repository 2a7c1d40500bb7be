import numpy as np
import pytest

from ecgtwin.data.record import LEADS, RecordError, canonical_lead, parse_age, parse_sex, to_canonical_order


@pytest.mark.parametrize("name,expected", [
    ("AVR", "aVR"), ("avr", "aVR"), ("aVR", "aVR"), ("i", "I"), ("III", "III"), ("v6", "V6"),
    ("MLII", "II"), ("Lead II", "II"), ("vx", None), ("X7", None), ("", None),
])
def test_lead_names_map_case_insensitively(name, expected):
    assert canonical_lead(name) == expected


def test_channels_are_reordered_to_canonical_order_and_extras_dropped():
    names = ["V1", "aVF", "I", "II", "III", "AVR", "avl", "V2", "V3", "V4", "V5", "V6", "vx"]
    signal = np.arange(len(names))[:, None] * np.ones((1, 10))
    out = to_canonical_order(signal, names)
    assert out.shape == (12, 10)
    assert [names[int(row[0])] for row in out] == ["I", "II", "III", "AVR", "avl", "aVF", "V1", "V2", "V3", "V4", "V5", "V6"]
    assert len(LEADS) == 12


def test_unmappable_leads_are_rejected_naming_the_missing_ones():
    names = ["I", "II", "III", "aVR", "aVL", "aVF", "V1", "V2", "V3", "V4", "V5", "X"]
    with pytest.raises(RecordError) as info:
        to_canonical_order(np.zeros((12, 5)), names)
    assert info.value.reason == "unmapped_leads"
    assert "V6" in str(info.value)


def test_sex_and_age_parsing():
    assert [parse_sex(v) for v in ("Male", "f", 0, "1", "unknown", None)] == ["M", "F", "M", "F", None, None]
    assert parse_age("300") == 90.0  # PTB-XL's code for ages over 89
    assert parse_age("NaN") is None and parse_age("x") is None and parse_age(" 56 ") == 56.0
