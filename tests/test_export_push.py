"""export_hub.push against a local stand-in for the Hub HTTP API, and a scan showing the token is never written.

The real `huggingface_hub` client runs unmodified; only HF_ENDPOINT points it at `tests.hub_standin.HubStandin`,
which records what arrived. The upload tests run twice: through the hf_xet upload pipeline that
`upload_folder` takes when hf_xet is installed, and through the single-commit path it takes without it.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
import traceback

import huggingface_hub.constants
import pytest

from stages import export_hub
from stages.common.config import params_from_dict
from stages.common.errors import StageError
from stages.tracking.runs import record_pipeline_run
from tests.hub_standin import HubStandin

TOKEN = "hf_FAKEtokenForScan0123456789abcdefXYZ"
USER = "standin-user"
REPO = f"{USER}/price-adapter"


def folder_bytes(folder) -> dict[str, bytes]:
    """Every file under `folder` as {posix path relative to it: bytes}."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def exception_text(exc: BaseException) -> str:
    """The exception as a traceback would print it, chained causes included."""
    return "".join(traceback.format_exception(exc))


@pytest.fixture(scope="module")
def exported(pipeline_project):
    paths, params, _ = pipeline_project  # export_hub is one of the stages it ran
    return paths, params


@pytest.fixture(autouse=True)
def online(monkeypatch):
    """Let huggingface_hub make requests even when the shell exports HF_HUB_OFFLINE=1 (read once at import)."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)


@pytest.fixture(params=["xet-pipeline", "single-commit"])
def upload_route(request, monkeypatch):
    """Which of upload_folder's two code paths runs: hf_xet's pipeline, or the one used without hf_xet."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", request.param == "single-commit")
    return request.param


@pytest.fixture
def hub(monkeypatch):
    """A running stand-in with HF_ENDPOINT and HF_TOKEN pointing push() at it."""
    with HubStandin(user=USER) as standin:
        monkeypatch.setenv("HF_ENDPOINT", standin.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield standin


def assert_token_only_in_authorization(hub: HubStandin) -> None:
    assert hub.requests
    for request in hub.requests:
        assert request.authorization == f"Bearer {TOKEN}", request
        others = [value for name, value in request.headers.items() if name != "authorization"]
        elsewhere = [request.path, *request.query.keys(), *request.query.values(), *others]
        assert not any(TOKEN in text for text in elsewhere), request
        assert TOKEN.encode() not in request.body, request


def test_push_uploads_every_file_byte_for_byte_to_a_private_repo(exported, hub, upload_route):
    paths, params = exported
    expected = folder_bytes(paths.export)
    assert {"adapter_model.safetensors", "adapter_config.json", "README.md"} <= set(expected)
    assert params.export.private is params_from_dict({}).export.private is True  # private is the default

    where = export_hub.push(paths.export, REPO, params.export.private)

    assert where == f"{hub.url}/{REPO}"
    assert hub.paths_requested()[:2] == ["GET /api/whoami-v2", "POST /api/repos/create"]
    assert hub.repos[REPO].private is True
    (commit,) = hub.commits
    assert (commit.repo_id, commit.revision, commit.pull_request) == (REPO, "main", None)
    assert commit.files == expected  # the safetensors file too: sent inline, no LFS/Xet transfer
    assert hub.repos[REPO].files == expected
    assert commit.summary == "Upload QLoRA adapter"
    assert hub.pull_requests == [] and hub.unhandled == []
    assert_token_only_in_authorization(hub)
    assert folder_bytes(paths.export) == expected  # push left export/ as it was


def test_push_with_create_pr_opens_a_pull_request_and_returns_its_url(exported, hub, upload_route):
    paths, params = exported
    expected = folder_bytes(paths.export)

    where = export_hub.push(paths.export, REPO, params.export.private, create_pr=True)

    (pr,) = hub.pull_requests
    assert where == f"{hub.url}/{REPO}/discussions/{pr.num}"
    (commit,) = hub.commits
    assert (commit.revision, commit.pull_request) == (pr.ref, pr.num)
    assert commit.files == expected
    assert hub.repos[REPO].files == {}  # main untouched: the files wait in the pull request
    assert hub.unhandled == []
    assert_token_only_in_authorization(hub)


def test_refused_token_fails_before_anything_is_created_or_uploaded(exported, monkeypatch):
    paths, params = exported
    with HubStandin(user=USER, refuse_token=True) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        with pytest.raises(StageError, match="nothing was uploaded") as info:
            export_hub.push(paths.export, REPO, params.export.private)

    assert hub.paths_requested() == ["GET /api/whoami-v2"]
    assert hub.repos == {} and hub.commits == []
    assert TOKEN not in str(info.value)
    assert TOKEN not in exception_text(info.value)


def test_unreachable_hub_fails_fast_before_any_upload(exported, monkeypatch):
    paths, params = exported
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_TOKEN", TOKEN)

    started = time.monotonic()
    with pytest.raises(StageError, match=r"cannot reach the Hub.*nothing was uploaded") as info:
        export_hub.push(paths.export, REPO, params.export.private)

    # whoami() is a single GET with no retry loop, so a refused connection fails at once
    assert time.monotonic() - started < 10
    assert TOKEN not in exception_text(info.value)


def test_existing_public_repo_is_not_used_when_private_is_asked(exported, hub):
    from tests.hub_standin import Repo

    paths, _ = exported
    hub.repos[REPO] = Repo(repo_id=REPO, repo_type="model", private=False)
    with pytest.raises(StageError, match="already exists and is public"):
        export_hub.push(paths.export, REPO, private=True)
    assert hub.commits == []


def test_silent_hub_times_out_before_any_upload(exported, monkeypatch):
    paths, _ = exported
    monkeypatch.setattr(export_hub, "WHOAMI_TIMEOUT_S", 1)
    with socket.socket() as silent:  # accepts connections (the kernel does) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        with pytest.raises(StageError, match="did not answer within 1 s; nothing was uploaded"):
            export_hub.push(paths.export, REPO, private=True)


def test_token_is_written_nowhere_by_a_pushing_export_and_its_mlflow_run(
    pipeline_project, hub, monkeypatch, capfd, caplog
):
    paths, params, _ = pipeline_project
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    pushing = dataclasses.replace(params, export=dataclasses.replace(params.export, push=True, repo_id=REPO))
    assert pushing.tracking.tracking_uri is None  # the store defaults to sqlite:///<project>/mlflow.db
    capfd.readouterr()  # drop whatever earlier tests printed

    result = export_hub.run(pushing, paths)
    run_id = record_pipeline_run(paths, pushing, started_by="test")
    out, err = capfd.readouterr()

    assert result.pushed_to == f"{hub.url}/{REPO}" and run_id
    (commit,) = hub.commits
    assert commit.files == folder_bytes(paths.export)  # run() rebuilt export/ and uploaded all of it
    assert hub.requests[0].authorization == f"Bearer {TOKEN}"  # the token was really in play

    secret = TOKEN.encode()
    scanned, leaks = [], []
    for file in sorted(paths.root.rglob("*")):
        if file.is_file() and not file.is_symlink():
            scanned.append(file.relative_to(paths.root).as_posix())
            if secret in file.read_bytes():
                leaks.append(scanned[-1])
    assert leaks == []
    for expected in ("mlflow.db", "export/README.md", "export/adapter_model.safetensors", "metrics/eval.json"):
        assert expected in scanned
    assert any(name.startswith("mlartifacts/") for name in scanned)
    assert TOKEN not in out and TOKEN not in err
    assert TOKEN not in caplog.text
