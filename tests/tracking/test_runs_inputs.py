"""log_inputs_once_stored: a dataset two runs insert at once is logged again, other failures are not hidden."""

import pytest
from mlflow.exceptions import MlflowException

from stages.tracking.runs import log_inputs_once_stored


class Store:
    """A client whose log_inputs fails with `errors`, one per call, then succeeds."""

    def __init__(self, *errors: str):
        self.errors, self.calls = list(errors), 0

    def log_inputs(self, run_id, datasets):
        self.calls += 1
        if self.errors:
            raise MlflowException(self.errors.pop(0))


COLLISION = 'BAD_REQUEST: (psycopg.errors.UniqueViolation) duplicate key value violates unique constraint "dataset_pk"'


def test_a_collision_on_the_datasets_key_is_tried_again():
    store = Store(COLLISION)
    log_inputs_once_stored(store, "run", [])
    assert store.calls == 2


def test_a_collision_every_time_fails_after_the_last_attempt():
    store = Store(COLLISION, COLLISION, COLLISION)
    with pytest.raises(MlflowException, match="UniqueViolation"):
        log_inputs_once_stored(store, "run", [])
    assert store.calls == 3


def test_any_other_failure_is_raised_at_once():
    store = Store("RESOURCE_DOES_NOT_EXIST: run 'run' not found")
    with pytest.raises(MlflowException, match="not found"):
        log_inputs_once_stored(store, "run", [])
    assert store.calls == 1
