"""GPTQ/AWQ calibration samples: split off the task data (never evaluated) or read from a file, and
stored with the job."""

from __future__ import annotations

import pytest

from quantselect.errors import InputError
from quantselect.service import Service, SubmitRequest
from tests.fixtures.common import EXAMPLES


def test_calibration_items_are_split_off_and_never_evaluated(tiny_llama):
    svc = Service()
    req = SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=60,
                        candidates=["int8", "int4-gptq"], calibration_samples=12)
    spec = svc.build_spec(req)
    cal = spec.calibration
    assert cal.source == "task data" and len(cal.texts) == 12 and len(cal.items) == 12
    assert len(spec.dataset) == 48
    from quantselect.domain.dataset import load_dataset

    full = load_dataset(EXAMPLES / "piqa-300.jsonl", limit=60)
    held = {full.items[i] for i in cal.items}
    assert not held & set(spec.dataset.items)  # evaluation never sees a calibration item
    assert all(t.startswith(full.items[i].prompt) for t, i in zip(cal.texts, cal.items))
    job = svc.repo.create_job(spec)
    again = svc.repo.get_job_spec(job.id)
    assert again.calibration == cal and len(again.dataset) == 48
    # the same request splits the same way (seeded)
    assert svc.build_spec(req).calibration.items == cal.items


def test_a_calibration_file_leaves_the_task_data_whole(tiny_llama, tmp_path):
    f = tmp_path / "calib.txt"
    f.write_text("first sample text\n\nsecond sample text\nthird\n")
    svc = Service()
    spec = svc.build_spec(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=30,
                                        candidates=["int4-awq"], calibration=str(f), calibration_samples=3))
    assert spec.calibration.texts == ("first sample text", "second sample text", "third")
    assert spec.calibration.source == str(f) and len(spec.dataset) == 30
    with pytest.raises(InputError, match="3 calibration samples, fewer than --calibration-samples 5"):
        svc.build_spec(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=30,
                                     candidates=["int4-awq"], calibration=str(f), calibration_samples=5))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine\n\xff\xfe broken\n")
    with pytest.raises(InputError, match="bad.txt:2: not valid UTF-8"):
        svc.build_spec(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"), limit=30,
                                     candidates=["int4-awq"], calibration=str(bad), calibration_samples=1))


def test_no_calibration_without_a_calibrated_candidate(tiny_llama):
    spec = Service().build_spec(SubmitRequest(model=str(tiny_llama), dataset=str(EXAMPLES / "piqa-300.jsonl"),
                                              limit=30, candidates=["int8"]))
    assert spec.calibration is None and len(spec.dataset) == 30
