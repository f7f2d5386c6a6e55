"""What reaches a job's last step: the count pairs, summed by key before they get there.

Every batch emits (key, rows) pairs (rows in, easy, hard, ~100 histogram bins...). The
Finish step reads them as a side input, so they must be combined per key on the way:
what it receives is one pair per key, O(keys), however many batches the job had.
"""
import pytest

from conftest import RUNNER, write_dataset
from titans.models.loading import ModelRef
from titans.pipeline.graphs import stages
from titans.pipeline.job import run_cascade
from titans.pipeline.plan import RunConfig, plan_run


@pytest.fixture
def received(monkeypatch):
    """The (key, rows) pairs each Finish step was handed, one list per job."""
    seen = []

    class Recorded(stages.Counts):
        def __init__(self, pairs):
            pairs = list(pairs)
            seen.append(pairs)
            super().__init__(pairs)

    monkeypatch.setattr(stages, "Counts", Recorded)  # the in-process runner shares this module
    return seen


def _run(data, out, models, batch_size):
    student, teacher = models
    config = RunConfig(input=data, output=str(out), student=ModelRef(student),
                       teacher=ModelRef(teacher), batch_size=batch_size, threshold=0.5)
    return run_cascade(plan_run(config), RUNNER)


def test_the_last_step_gets_one_pair_per_key_however_many_batches(tmp_path, models, received):
    data = tmp_path / "data"
    write_dataset(data, 4000, files=2, row_group_size=500)  # a batch never spans row groups
    few = _run(str(data), tmp_path / "few", models, batch_size=500)     # ~8 batches
    many = _run(str(data), tmp_path / "many", models, batch_size=50)    # ~80 batches
    assert len(received) == 2
    few_pairs, many_pairs = received
    # 10x the batches, not more pairs: at most the histogram bins that happen to be filled
    # differ (a key per filled bin)
    assert len(many_pairs) <= len(few_pairs) + 10, (len(few_pairs), len(many_pairs))
    assert len(many_pairs) < 200
    for pairs in received:
        keys = [k for k, _ in pairs]
        assert len(keys) == len(set(keys)), "a key reached Finish more than once"
    for report in (few, many):
        assert report["rows_in"] == 4000 == report["rows_easy"] + report["rows_hard"]
    assert few["rows_easy"] == many["rows_easy"] and few["rows_hard"] == many["rows_hard"]
