"""Which stage failures the flow retries: those that may pass, never bad input, params or code."""

import pytest

from flows.retrain import StageFailed, is_transient, loggable, mlflow_hint, retry_when_transient, stage_exit_status

DVC_FAILED = "ERROR: failed to reproduce 'train_qlora': failed to run: python -m stages.train_qlora, exited with {}"


@pytest.mark.parametrize(
    ("status", "transient"),
    [
        (1, False),  # bad input, bad params, or an uncaught exception (a bug)
        (2, False),
        (75, True),  # an OS error in the stage (stages/common/cli.TRANSIENT_EXIT)
        (-9, True),  # SIGKILL: the OOM killer, a lost worker
        (137, True),
    ],
)
def test_stage_exit_status_decides_the_retry(status, transient):
    output = "[train_qlora] some log line\n" + DVC_FAILED.format(status)
    assert stage_exit_status(output) == status
    assert is_transient(stage_exit_status(output), output) is transient


def test_dvc_lock_contention_is_transient():
    output = "ERROR: Unable to acquire lock. Most likely another DVC process is running"
    assert stage_exit_status(output) is None and is_transient(None, output)
    assert not is_transient(None, "ERROR: unexpected error")


class FailedState:
    def __init__(self, error):
        self.error = error

    def result(self, raise_on_failure=True):
        return self.error


def test_retry_condition_reads_the_stage_failure():
    assert retry_when_transient(None, None, FailedState(StageFailed("x", "killed", transient=True)))
    assert not retry_when_transient(None, None, FailedState(StageFailed("x", "bad input", transient=False)))
    assert not retry_when_transient(None, None, FailedState(ValueError("a bug in the flow")))


def test_progress_frames_and_cursor_codes_stay_out_of_the_log():
    assert loggable(" 40%|████      | 2/5 [00:01<00:02,  1.45it/s]\x1b[A") == ""
    assert loggable("\x1b[A 33%|███▎      | 50/150 [01:55<03:20,  2.00s/it]") == ""
    line = "step    50/150 | val loss 1.1254 | lr 7.89e-04"
    assert loggable(f"\x1b[A{line}") == line
    assert loggable("frame 1\rframe 2\r[train_qlora] done in 3.0s") == "[train_qlora] done in 3.0s"


def test_the_mlflow_link_is_the_servers_page_or_the_ui_command_for_a_local_store():
    served = mlflow_hint("https://mlflow.example/", "abc", "3")
    assert served == "MLflow run `abc` on the tracking server: https://mlflow.example/#/experiments/3/runs/abc"
    local = mlflow_hint("sqlite:////srv/p/mlflow.db", "abc", "3")
    assert "`mlflow ui --backend-store-uri sqlite:////srv/p/mlflow.db`" in local
    assert local.endswith("http://127.0.0.1:5000/#/experiments/3/runs/abc")
