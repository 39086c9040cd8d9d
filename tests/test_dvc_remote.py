"""Sharing a run through a DVC remote: the flow with `flow.push: true` pushes every cached output to a local
remote; a `git clone` elsewhere gets them with `dvc pull` and is up to date (only the uncached base model is
rebuilt, to the same bytes); a push that cannot reach its remote is retried, fails the run, keeps the outputs
and leaks no password. Unit tests pin the URL masking, the failure classification and the remote lookup.

The workspace is conftest's `flow_project`, run once through the flow; the test that changes a workspace
works on a copy of it (`workspace_copy`)."""

import hashlib
import re
import shutil
from pathlib import Path

import pytest
import yaml

from flows.remote import PushFailed, mask_secrets, push_failure, push_target, pushed_files
from infra.servers import free_port
from stages.common.config import params_from_dict
from stages.common.errors import ConfigError
from tests.flow_workspace import dvc, flow, latest_report, run, set_param

SHARED = ("models/adapter", "export", "data/splits", "metrics", "reports", "eval", "plots")


def cached_hashes(root: Path) -> set[str]:
    """The md5 of every cached output in dvc.lock and of the `dvc add`ed raw CSV."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    outs = [out for stage in lock["stages"].values() for out in stage.get("outs", [])]
    cached = {out["md5"] for out in outs if out["path"] != "models/base"}
    raw = yaml.safe_load((root / "data" / "raw" / "prices.csv.dvc").read_text())
    return cached | {raw["outs"][0]["md5"]}


def in_remote(remote: Path, md5: str) -> bool:
    return (remote / "files" / "md5" / md5[:2] / md5[2:]).is_file()


def file_hashes(root: Path, folders: tuple[str, ...]) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.md5(path.read_bytes()).hexdigest()
        for folder in folders
        for path in sorted((root / folder).rglob("*"))
        if path.is_file()
    }


def test_the_flow_pushes_every_cached_output_after_training(flow_project, dvc_remote):
    root, _, done, report = flow_project
    remote = dvc_remote
    output = done.stdout + done.stderr
    pushed = re.search(r"pushed (\d+) files to DVC remote `shared` \((.+?)\)", output)
    assert pushed and int(pushed.group(1)) > 10 and pushed.group(2) == str(remote)
    missing = [md5 for md5 in cached_hashes(root) if not in_remote(remote, md5)]
    assert not missing  # directory listings (.dir) included, so `dvc pull` can rebuild every folder
    assert "Retrain report: retrained" in report and "## Shared outputs" in report and pushed.group(0) in report


def test_a_clone_pulls_the_run_and_is_up_to_date(flow_project, tmp_path):
    root, env, _, _ = flow_project
    clone = tmp_path / "clone"
    run(["git", "clone", "-q", str(root), str(clone)], tmp_path, env)
    # What a teammate needs from git besides the code: dvc.lock, which names the outputs. A team commits it
    # with the run; here it is committed in the clone, so the shared workspace's history stays as it was.
    shutil.copy2(root / "dvc.lock", clone / "dvc.lock")
    run(["git", "add", "dvc.lock"], clone, env)
    run(["git", "commit", "-qm", "the run's dvc.lock"], clone, env)
    shutil.copytree(root / "models" / "tiny-source", clone / "models" / "tiny-source")  # the base's source
    dvc(["pull"], clone, env)
    assert "deleted:            models/base" in dvc(["status"], clone, env).stdout  # not cached: not pushed
    rebuilt = dvc(["repro"], clone, env).stdout
    assert re.findall(r"Running stage '(\w+)'", rebuilt) == ["base_model"], rebuilt  # same bytes: no retraining
    assert "Data and pipelines are up to date." in dvc(["status"], clone, env).stdout
    assert "Running stage" not in dvc(["repro"], clone, env).stdout
    assert file_hashes(clone, SHARED) == file_hashes(root, SHARED)
    assert not (clone / "mlflow.db").exists()  # the MLflow store is not a DVC output (README: share a server)


def test_a_push_that_cannot_reach_its_remote_is_retried_fails_the_run_and_leaks_no_password(workspace_copy):
    root, env = workspace_copy
    url = f"http://bob:hunter2@127.0.0.1:{free_port()}/dvc"  # nothing listens there
    set_param(root, "flow", "remote", "unreachable")  # no stage reads `flow`: the pipeline stays up to date
    set_param(root, "flow", "retry_delay_seconds", 0)
    adapter = root / "models" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    dvc(["remote", "add", "--local", "unreachable", url], root, env)  # .dvc/config.local, as credentials go
    done = flow(root, env, check=False)
    output = done.stdout + done.stderr
    report = latest_report(env)
    assert done.returncode == 1, output[-3000:]
    assert "retrain failed: push failed: `dvc push -r unreachable` to http://bob:***@127.0.0.1" in done.stderr
    assert "Cannot connect to host" in done.stderr and "push them by hand with `dvc push -r unreachable`" in output
    assert output.count("$ dvc push -r unreachable") == 2  # network trouble: retried once (flow.stage_retries)
    assert "Retrain report: up to date" in report and "**push failed:" in report
    assert "hunter2" not in output + report
    assert adapter.stat().st_mtime_ns == before and (root / "export" / "adapter_model.safetensors").is_file()


REFUSED = """\
ERROR: failed to transfer '764efa88' - Cannot connect to host 127.0.0.1:9 ssl:default [Connect call failed]
ERROR: failed to transfer '00952005' - Cannot connect to host 127.0.0.1:9 ssl:default [Connect call failed]
ERROR: failed to push data to the cloud - 2 files failed to upload
"""
NOT_A_DIRECTORY = "ERROR: unexpected error - [Errno 20] Not a directory: '/srv/file/remote/files/md5/76/4e'\n"


def test_network_trouble_is_transient_and_a_broken_path_is_not():
    refused = push_failure("r", "http://h/dvc", 1, REFUSED)
    assert refused.transient
    assert str(refused) == (
        "`dvc push -r r` to http://h/dvc failed: ERROR: failed to transfer '764efa88' - Cannot connect to host "
        "127.0.0.1:9 ssl:default [Connect call failed]; ERROR: failed to push data to the cloud - 2 files failed "
        "to upload"
    )
    broken = push_failure("r", "/srv/file/remote", 255, NOT_A_DIRECTORY)
    assert not broken.transient and "Not a directory" in str(broken)
    assert str(push_failure("r", "/x", 3, "")).endswith("failed: exit code 3")


def test_passwords_in_urls_are_masked():
    assert mask_secrets("ssh://bob:hunter2@host/srv/dvc") == "ssh://bob:***@host/srv/dvc"
    text = "to https://key:se%2Fcret@minio.local:9000/bucket failed\nand s3://bucket/path ok"
    assert mask_secrets(text) == "to https://key:***@minio.local:9000/bucket failed\nand s3://bucket/path ok"
    assert mask_secrets("ssh://bob@host:2222/srv") == "ssh://bob@host:2222/srv"  # no password: nothing to hide


def test_files_pushed_are_read_from_dvc_output():
    assert pushed_files("Collecting\n37 files pushed\n") == 37
    assert pushed_files("1 file pushed\n") == 1
    assert pushed_files("Everything is up to date.\n") == 0


DVC_CONFIG = """\
[core]
    remote = shared
['remote "shared"']
    url = ssh://bob:hunter2@host/srv/dvc
['remote "other"']
    url = s3://bucket/path
"""


def test_push_target_names_the_remote_and_masks_its_url(tmp_path):
    (tmp_path / ".dvc").mkdir()
    (tmp_path / ".dvc" / "config").write_text(DVC_CONFIG)
    assert push_target(tmp_path, None) == ("shared", "ssh://bob:***@host/srv/dvc")
    assert push_target(tmp_path, "other") == ("other", "s3://bucket/path")
    with pytest.raises(PushFailed, match=r"flow.remote: no DVC remote named 'nosuch' \(remotes: other, shared\)"):
        push_target(tmp_path, "nosuch")
    (tmp_path / ".dvc" / "config").write_text(DVC_CONFIG.replace("    remote = shared\n", ""))
    with pytest.raises(PushFailed, match=r"no default DVC remote is set: run `dvc remote add -d storage <url>`"):
        push_target(tmp_path, None)


def test_flow_remote_must_be_a_remote_name_not_a_url():
    assert params_from_dict({"flow": {"push": True, "remote": "team-store"}}).flow.remote == "team-store"
    with pytest.raises(ConfigError, match=r"flow.remote: expected the name of a DVC remote"):
        params_from_dict({"flow": {"remote": "s3://bucket/path"}})
    with pytest.raises(ConfigError, match=r"flow.push: expected bool, got 'yes'"):
        params_from_dict({"flow": {"push": "yes"}})
