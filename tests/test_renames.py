"""Names that changed keep working: the flags, HTTP fields, stored jobs and study keys of earlier versions."""

import optuna
import pytest

from adapruner.cli import build_parser
from adapruner.search import SearchJob, SearchSpace, StudyKey, TrialKey, stored
from adapruner.search.job import LEGACY_FIELDS
from adapruner.search.record import LEGACY_KEYS


def test_the_earlier_flags_reach_the_same_fields():
    parse = build_parser().parse_args
    assert parse(["search", "--ratio", "0.3"]).target == parse(["search", "--target", "0.3"]).target == (0.3,)
    assert parse(["search", "--calibration", "random"]).subset_mode == "random"
    assert parse(["search", "--subset-mode", "all"]).subset_mode == "all"
    assert parse(["prune", "--ratio", "0.25"]).target == parse(["prune", "--target", "0.25"]).target == 0.25


def test_a_stored_job_of_an_earlier_version_reads_as_the_same_job():
    now = SearchJob(model="tiny", calibration=("toy",), target=0.3, space=SearchSpace(subset_mode="random"))
    before = now.to_dict()
    before["ratio"] = before.pop("target")
    before["recover"] = before.pop("finetune")
    before["space"]["calibration"] = before["space"].pop("subset_mode")
    assert SearchJob.from_dict(before) == now
    assert SearchJob.from_dict(before).identity() == now.identity()  # so a resume finds it the same job
    assert set(LEGACY_FIELDS.values()) <= set(now.to_dict())


def test_the_http_api_takes_the_earlier_field_names():
    from service.schemas import JobCreate

    earlier = JobCreate.model_validate({"ratio": [0.1, 0.3], "recover": {"steps": 3},
                                        "space": {"calibration": "random"}})
    now = JobCreate.model_validate({"target": [0.1, 0.3], "finetune": {"steps": 3}, "space": {"subset_mode": "random"}})
    assert earlier == now and earlier.targets == [0.1, 0.3]
    assert earlier.to_search_job().to_dict() == now.to_search_job().to_dict()
    assert "target" in earlier.model_dump() and "ratio" not in earlier.model_dump()  # stored under the one name


@pytest.mark.parametrize("key", sorted(LEGACY_KEYS))
def test_study_keys_stored_under_their_earlier_names_still_read(key):
    study = optuna.create_study()
    study.set_user_attr(LEGACY_KEYS[key], {"test": 12.5})
    assert stored(study.user_attrs, key) == {"test": 12.5}
    study.set_user_attr(key, {"test": 9.0})  # the current name wins where both are there
    assert stored(study.user_attrs, key) == {"test": 9.0}
    assert stored({}, key, "none") == "none"


def test_each_renamed_key_is_a_current_key():
    current = {v for cls in (StudyKey, TrialKey) for k, v in vars(cls).items() if k.isupper()}
    assert set(LEGACY_KEYS) <= current
    assert not set(LEGACY_KEYS.values()) & current
