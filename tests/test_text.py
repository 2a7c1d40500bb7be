import os
import subprocess
import sys

import numpy as np
import pytest

from ecgtwin.text import BUNDLED, StatementEncoder, resolve_model_path, split_statements


def test_reports_split_into_statements():
    assert split_statements("Sinus rhythm. First degree AV block. PR 0.24 s.") == [
        "Sinus rhythm", "First degree AV block", "PR 0.24 s"]
    assert split_statements("Sinus rhythm|Borderline T wave abnormalities") == [
        "Sinus rhythm", "Borderline T wave abnormalities"]
    assert split_statements("sinusrhythmus periphere niederspannung") == ["sinusrhythmus periphere niederspannung"]
    assert split_statements("Normal ECG; normal ecg.\n") == ["Normal ECG"]
    assert split_statements("") == []


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return StatementEncoder(cache_dir=tmp_path_factory.mktemp("cache"))


def test_bundled_encoder_gives_meaningful_unit_embeddings(encoder):
    v = encoder.embed(["Sinus bradycardia", "Marked sinus bradycardia", "Left bundle branch block"])
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, atol=1e-5)
    sim = v @ v.T
    assert sim[0, 1] > sim[0, 2] + 0.3  # related statements are close, unrelated ones are not


def test_each_distinct_statement_is_encoded_once_and_the_cache_persists(encoder):
    before = encoder.encoded
    encoder.embed(["Atrial fibrillation", "Atrial fibrillation", "ST elevation"])
    assert encoder.encoded - before == 2
    encoder.embed(["ST elevation"])
    assert encoder.encoded - before == 2
    again = StatementEncoder(cache_dir=encoder._cache_file.parent)
    np.testing.assert_array_equal(again.embed(["ST elevation"]), encoder.embed(["ST elevation"]))
    assert again.encoded == 0 and again._model is None  # served from disk, model never loaded


def test_works_with_the_network_switched_off(tmp_path):
    code = "from ecgtwin.text import StatementEncoder; print(StatementEncoder().embed(['Normal ECG']).shape)"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert "(1, 384)" in done.stdout


def test_a_local_model_path_is_accepted_and_a_wrong_one_is_a_clear_error(tmp_path):
    assert resolve_model_path(str(resolve_model_path(BUNDLED))) == resolve_model_path(BUNDLED)
    with pytest.raises(FileNotFoundError, match="not a local sentence-transformers model"):
        StatementEncoder(str(tmp_path))


def test_condition_tokens_keep_each_statement_once_and_give_every_record_its_own(encoder):
    from ecgtwin.conditioning import Conditioner, PatientInfoNormalizer

    reports = ["Sinus rhythm. Left bundle branch block", "Sinus rhythm", "", "Left bundle branch block. Sinus rhythm"] * 50
    normalizer = PatientInfoNormalizer.fit(np.full(len(reports), 70.0), np.full(len(reports), 60.0))
    conditions = Conditioner(encoder, normalizer, max_statements=8).build(
        reports, np.full(len(reports), 70.0), np.full(len(reports), 60.0), ["F"] * len(reports))
    assert conditions.vocabulary.shape == (3, 384)  # the empty statement, and two distinct ones: not 200 x 2
    tokens, mask = conditions.tokens(slice(0, 4))
    rhythm, lbbb = encoder.embed(["Sinus rhythm", "Left bundle branch block"])
    np.testing.assert_allclose(tokens[0, :, :384].numpy(), np.stack([rhythm, lbbb]), atol=1e-6)
    np.testing.assert_allclose(tokens[3, :, :384].numpy(), np.stack([lbbb, rhythm]), atol=1e-6)
    assert mask[:4].tolist() == [[True, True], [True, False], [True, False], [True, True]]
    assert not tokens[2, :, :384].any() and tokens[2, 0, 384:].abs().sum() > 0  # no statement: patient info only
