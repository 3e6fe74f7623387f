"""The loopback Hub (ota_trainer.testing.local_hub) against the real huggingface_hub client,
transformers and ModelCard: no mocks, every call goes over HTTP to 127.0.0.1."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from urllib.parse import urlsplit

import pytest
import torch

from ota_trainer.testing.pytest_fixtures import hub_env

REPO = "me/tiny"


def _make_folder(root, readme: str | None = None):
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "config.json").write_text('{"a": 1}')
    (root / "sub" / "data.txt").write_text("data v1")
    (root / "sub" / "deeper" / "x.bin").write_bytes(os.urandom(3000))
    (root / "README.md").write_text(
        readme or "---\nlicense: apache-2.0\ntags: [ota, test]\nlibrary_name: transformers\n---\n# Tiny\n"
    )
    return root


def _gets(hub, path: str) -> int:
    return sum(1 for m, p in hub.requests if m == "GET" and p.endswith(path) and "/resolve/" in p)


@pytest.fixture
def uploaded(local_hub, tmp_path):
    """A repo with one upload commit; returns (api, commit sha, local folder)."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(REPO)
    folder = _make_folder(tmp_path / "up")
    info = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="upload")
    return api, info.oid, folder


def test_create_repo_conflict_and_exist_ok(local_hub):
    from huggingface_hub import HfApi, create_repo
    from huggingface_hub.errors import HfHubHTTPError

    url = create_repo(REPO)  # module-level helper: the fixture patched its endpoint
    assert url.repo_id == REPO and url.startswith(local_hub.url)
    with pytest.raises(HfHubHTTPError) as e:
        HfApi().create_repo(REPO)
    assert e.value.response.status_code == 409
    assert HfApi().create_repo(REPO, exist_ok=True) == url
    assert HfApi().create_repo("data", repo_type="dataset").repo_id == "local-user/data"  # no namespace: the user's


def test_upload_folder_is_one_commit_and_downloads_by_branch_and_sha(uploaded, local_hub, tmp_path):
    from huggingface_hub import hf_hub_download

    api, sha, folder = uploaded
    assert len(sha) == 40 and all(c in "0123456789abcdef" for c in sha)
    assert [m for m, p in local_hub.requests if p.endswith("/commit/main")] == ["POST"]
    assert [c.title for c in api.list_repo_commits(REPO)] == ["upload", "initial commit"]

    (folder / "sub" / "data.txt").write_text("data v2")
    sha2 = api.upload_file(path_or_fileobj=folder / "sub" / "data.txt", path_in_repo="sub/data.txt", repo_id=REPO).oid
    assert sha2 != sha
    assert open(hf_hub_download(REPO, "sub/data.txt")).read() == "data v2"
    assert open(hf_hub_download(REPO, "sub/data.txt", revision=sha)).read() == "data v1"
    got = hf_hub_download(REPO, "sub/deeper/x.bin", revision=sha2)
    assert open(got, "rb").read() == (folder / "sub" / "deeper" / "x.bin").read_bytes()


def test_snapshot_download_patterns_revision_and_dry_run(uploaded, local_hub):
    from huggingface_hub import snapshot_download

    api, sha, folder = uploaded
    api.upload_file(path_or_fileobj=b"data v2", path_in_repo="sub/data.txt", repo_id=REPO)
    local_hub.requests.clear()
    plan = snapshot_download(REPO, revision=sha, allow_patterns=["sub/*"], dry_run=True)
    # the client matches with fnmatch: "*" crosses "/"
    assert sorted(i.filename for i in plan) == ["sub/data.txt", "sub/deeper/x.bin"]
    assert not any(i.is_cached for i in plan)
    assert not [p for m, p in local_hub.requests if m == "GET" and "/resolve/" in p]  # a dry run downloads nothing

    old = snapshot_download(REPO, revision=sha, allow_patterns=["sub/*"])
    assert os.path.basename(old) == sha
    assert sorted(os.listdir(os.path.join(old, "sub"))) == ["data.txt", "deeper"]
    assert not os.path.exists(os.path.join(old, "config.json"))
    assert open(os.path.join(old, "sub", "data.txt")).read() == "data v1"
    new = snapshot_download(REPO)
    assert open(os.path.join(new, "sub", "data.txt")).read() == "data v2"
    assert sorted(os.listdir(new)) == [".gitattributes", "README.md", "config.json", "sub"]


def test_cache_hit_makes_no_second_download(uploaded, local_hub):
    from huggingface_hub import hf_hub_download

    _, sha, _ = uploaded
    first = hf_hub_download(REPO, "config.json")
    assert hf_hub_download(REPO, "config.json") == first
    assert _gets(local_hub, "/config.json") == 1  # the second call only sends a HEAD
    n = len(local_hub.requests)
    assert hf_hub_download(REPO, "config.json", revision=sha) == first
    assert len(local_hub.requests) == n  # by commit sha: no request at all


def test_listing_info_card_data_and_file_exists(uploaded):
    api, sha, _ = uploaded
    files = ["README.md", "config.json", "sub/data.txt", "sub/deeper/x.bin"]
    assert api.list_repo_files(REPO) == [".gitattributes", *files]
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == sha and info.private is False
    assert {s.rfilename: s.size for s in info.siblings}["sub/deeper/x.bin"] == 3000
    assert info.tags == ["ota", "test"] and info.library_name == "transformers"
    assert info.card_data["license"] == "apache-2.0"
    assert api.file_exists(REPO, "sub/data.txt") and not api.file_exists(REPO, "sub/nope.txt")
    top = {e.path: type(e).__name__ for e in api.list_repo_tree(REPO)}
    assert top == {
        "sub": "RepoFolder",
        ".gitattributes": "RepoFile",
        "README.md": "RepoFile",
        "config.json": "RepoFile",
    }


def test_model_card_push_and_load(local_hub):
    from huggingface_hub import HfApi, ModelCard, ModelCardData

    HfApi().create_repo(REPO)
    card = ModelCard.from_template(
        ModelCardData(license="mit", tags=["ota-merge-ready"], base_model="org/base"),
        model_description="A tiny expert.",
    )
    card.push_to_hub(REPO)
    loaded = ModelCard.load(REPO)
    assert loaded.data.tags == ["ota-merge-ready"] and loaded.data.base_model == "org/base"
    assert "A tiny expert." in loaded.text
    assert HfApi().model_info(REPO).tags == ["ota-merge-ready"]
    # the Hub's YAML check (ModelCard parses the YAML itself first, so ask the route directly)
    req = urllib.request.Request(
        f"{local_hub.url}/api/validate-yaml",
        method="POST",
        data=json.dumps({"content": "---\ntags: [unclosed\n---\n", "repoType": "model"}).encode(),
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req)
    assert e.value.code == 400 and json.loads(e.value.read())["errors"]


@pytest.mark.local_hub(token="secret")
def test_private_repo_needs_the_token(local_hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    api = HfApi()  # HF_TOKEN=secret, set by the fixture
    api.create_repo(REPO, private=True)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=REPO)
    assert api.model_info(REPO).private is True
    assert open(hf_hub_download(REPO, "config.json")).read() == "{}"

    anon = HfApi(token=False)
    with pytest.raises(RepositoryNotFoundError):
        anon.model_info(REPO)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "config.json", token=False, cache_dir=tmp_path / "other_cache")
    with pytest.raises(RepositoryNotFoundError):
        anon.list_repo_files(REPO)
    with pytest.raises(HfHubHTTPError) as e:  # writes need the token, public repo or not
        anon.create_repo("me/other")
    assert e.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError) as e:  # a wrong token is refused as such
        HfApi(token="wrong").model_info(REPO)
    assert e.value.response.status_code == 401 and "Invalid credentials" in str(e.value)


@pytest.mark.local_hub(lfs=True)
def test_lfs_upload_of_a_large_file(local_hub, tmp_path):
    from huggingface_hub import HfApi, hf_hub_download

    data = os.urandom(20 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(data)
    api = HfApi()
    api.create_repo(REPO)
    api.upload_file(path_or_fileobj=tmp_path / "big.bin", path_in_repo="weights/big.bin", repo_id=REPO)
    methods = [(m, p.split("/")[-1]) for m, p in local_hub.requests]
    assert ("POST", "batch") in methods and ("POST", "verify") in methods
    assert [m for m, p in local_hub.requests if p.startswith("/_lfs/")] == ["PUT"]
    sha256 = hashlib.sha256(data).hexdigest()
    (sib,) = [s for s in api.model_info(REPO, files_metadata=True).siblings if s.rfilename == "weights/big.bin"]
    assert sib.lfs.sha256 == sha256 and sib.lfs.size == len(data)
    path = hf_hub_download(REPO, "weights/big.bin")
    assert os.path.basename(os.path.realpath(path)) == sha256  # the cache blob is named by the LFS etag
    assert hashlib.sha256(open(path, "rb").read()).hexdigest() == sha256
    # same content again: the batch endpoint says it is stored, nothing is re-sent
    local_hub.requests.clear()
    api.upload_file(path_or_fileobj=tmp_path / "big.bin", path_in_repo="copy.bin", repo_id=REPO)
    assert not [p for m, p in local_hub.requests if m == "PUT"]


@pytest.mark.local_hub(lfs=True)  # the safetensors file is binary: it goes through LFS too
def test_tiny_llama_push_to_hub_and_from_pretrained(local_hub):
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    model.push_to_hub("me/tiny-llama")
    assert AutoConfig.from_pretrained("me/tiny-llama").num_hidden_layers == 2
    loaded = AutoModelForCausalLM.from_pretrained("me/tiny-llama")
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)


def test_one_503_on_resolve_head_is_retried(uploaded, local_hub):
    """hf_hub_download retries the metadata HEAD once on 5xx when nothing is cached."""
    from huggingface_hub import hf_hub_download

    fault = local_hub.inject_faults(status=503, times=1, path_contains="/resolve/", method="HEAD")
    path = hf_hub_download(REPO, "config.json")
    assert open(path).read() == '{"a": 1}' and fault.times == 0
    heads = [m for m, p in local_hub.requests if p.endswith("/resolve/main/config.json")]
    assert heads == ["HEAD", "HEAD", "GET"]


def test_a_503_on_the_file_get_is_not_retried_by_the_client(uploaded, local_hub):
    """The client's GET retries only 408/429 (and dropped connections): a 5xx surfaces; callers retry."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    local_hub.inject_faults(status=503, times=1, path_contains="/resolve/", method="GET")
    with pytest.raises(HfHubHTTPError) as e:
        hf_hub_download(REPO, "config.json")
    assert e.value.response.status_code == 503
    assert open(hf_hub_download(REPO, "config.json")).read() == '{"a": 1}'


def test_dropped_download_resumes_with_range(local_hub):
    from huggingface_hub import HfApi, hf_hub_download

    data = os.urandom(200_000)
    HfApi().create_repo(REPO)
    HfApi().upload_file(path_or_fileobj=data, path_in_repo="blob.dat", repo_id=REPO)
    local_hub.inject_faults(drop_after_bytes=50_000, times=1, path_contains="blob.dat")
    path = hf_hub_download(REPO, "blob.dat")  # ~1 s: the client sleeps before resuming
    assert open(path, "rb").read() == data
    assert _gets(local_hub, "/blob.dat") == 2  # the second one asked for the remaining bytes (206)


def test_commit_errors_parent_branch_and_deletes(uploaded):
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    api, sha, _ = uploaded
    add = [CommitOperationAdd("new.txt", b"x")]
    with pytest.raises(RevisionNotFoundError):
        api.create_commit(REPO, add, commit_message="m", revision="nope")
    sha2 = api.create_commit(REPO, add, commit_message="m", parent_commit=sha).oid
    with pytest.raises(HfHubHTTPError) as e:  # sha is no longer the head
        api.create_commit(REPO, [CommitOperationAdd("b.txt", b"y")], commit_message="m", parent_commit=sha)
    assert e.value.response.status_code == 412
    api.create_commit(REPO, [CommitOperationDelete("sub/"), CommitOperationDelete("new.txt")], commit_message="rm")
    assert api.list_repo_files(REPO) == [".gitattributes", "README.md", "config.json"]
    assert "new.txt" in api.list_repo_files(REPO, revision=sha2)
    api.create_branch(REPO, branch="dev", revision=sha)
    assert api.list_repo_files(REPO, revision="dev")[-1] == "sub/deeper/x.bin"
    api.create_tag(REPO, tag="v1", revision=sha2)
    assert api.model_info(REPO, revision="v1").sha == sha2
    assert [t.name for t in api.list_repo_refs(REPO).tags] == ["v1"]


def test_datasets_and_cli(tmp_path):
    """The CLI prints the URL and serves until stopped; dataset repos live under /datasets/."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ota_trainer.testing.local_hub", "--root", str(tmp_path / "hub")],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        code = (
            "from huggingface_hub import HfApi, hf_hub_download as d\n"
            "HfApi().create_repo('me/ds', repo_type='dataset')\n"
            "HfApi().upload_file(path_or_fileobj=b'a,b', path_in_repo='t.csv', repo_id='me/ds', repo_type='dataset')\n"
            "print(open(d('me/ds', 't.csv', repo_type='dataset')).read())\n"
        )
        env = hub_env(url, tmp_path / "home")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert out.stdout.strip() == "a,b"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (tmp_path / "hub" / "repos" / "datasets" / "me" / "ds" / "repo.json").is_file()


# -- request bodies: access checks before the body, size caps -------------------------------------------------------
# Raw HTTP over a socket: these tests control exactly which bytes are sent (headers only, a few body bytes...).

_TIMEOUT = 5.0  # every answer below must arrive well within this, without the declared body being sent


def _connect(hub) -> socket.socket:
    u = urlsplit(hub.url)
    return socket.create_connection((u.hostname, u.port), timeout=_TIMEOUT)


def _head(method: str, path: str, hub, **headers: str) -> bytes:
    lines = [
        f"{method} {path} HTTP/1.1",
        f"Host: {urlsplit(hub.url).netloc}",
        *(f"{k.replace('_', '-')}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def _response(sock: socket.socket, method: str = "POST") -> tuple[int, http.client.HTTPMessage, dict]:
    resp = http.client.HTTPResponse(sock, method=method)
    resp.begin()
    body = resp.read()
    return resp.status, resp.headers, json.loads(body) if body else {}


def _closed_by_server(sock: socket.socket) -> bool:
    """The server sent its end of the connection (EOF), with no further bytes."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True


def _raw_status_line(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        assert chunk, data
        data += chunk
    return data.split(b"\r\n", 1)[0]


@pytest.mark.local_hub(token="secret")
def test_unauthorized_huge_uploads_are_refused_before_their_body_is_read(local_hub):
    """A 50 GB commit or LFS upload without the token is answered at once: only the headers and
    100 bytes are ever sent, so the answer cannot have waited for (or read) the body."""
    from huggingface_hub import HfApi

    HfApi().create_repo(REPO, private=True)
    head = HfApi().model_info(REPO).sha
    huge = str(50 * 10**9)
    cases = [
        ("POST", f"/api/models/{REPO}/commit/main", {}, 401),  # no token, private repo
        ("POST", f"/api/models/{REPO}/commit/main", {"Authorization": "Bearer wrong"}, 401),
        ("POST", "/api/models/me/not-there/commit/main", {}, 401),  # writes need the token, repo or not
        ("POST", f"/api/models/{REPO}/preupload/main", {}, 401),
        ("POST", "/api/repos/create", {}, 401),
        ("POST", f"/{REPO}.git/info/lfs/objects/batch", {}, 401),
        ("PUT", f"/_lfs/{'0' * 64}?size={huge}&sig=forged", {}, 403),  # LFS URLs authorize themselves
        ("POST", f"/api/models/{REPO}/commit/no-such-branch", {"Authorization": "Bearer secret"}, 404),
    ]
    for method, path, auth, status in cases:
        with _connect(local_hub) as sock:
            sock.sendall(_head(method, path, local_hub, Content_Length=huge, **auth) + b'{"key": "header", ' * 5)
            got, headers, body = _response(sock, method)  # within _TIMEOUT, or socket.timeout fails the test
            assert got == status, (path, got, body)
            # the body stays unread: the connection cannot carry another request
            assert headers["Connection"] == "close" and _closed_by_server(sock), path
    assert HfApi().model_info(REPO).sha == head


@pytest.mark.local_hub(token="secret")
def test_expect_100_continue_is_sent_only_to_authorized_requests(local_hub):
    from huggingface_hub import HfApi

    HfApi().create_repo(REPO)
    with _connect(local_hub) as sock:  # unauthorized: the final answer comes instead of "100 Continue"
        sock.sendall(
            _head("POST", f"/api/models/{REPO}/commit/main", local_hub, Content_Length="1000000", Expect="100-continue")
        )
        assert _raw_status_line(sock).startswith(b"HTTP/1.1 401 ")
    body = json.dumps({"files": [{"path": "a.txt", "sample": "", "size": 1}]}).encode()
    with _connect(local_hub) as sock:  # authorized: invited to send the body, then served
        sock.sendall(
            _head(
                "POST",
                f"/api/models/{REPO}/preupload/main",
                local_hub,
                Content_Length=str(len(body)),
                Expect="100-continue",
                Authorization="Bearer secret",
                Content_Type="application/json",
            )
        )
        assert _raw_status_line(sock) == b"HTTP/1.1 100 Continue"
        sock.sendall(body)
        status, _, data = _response(sock)
        assert status == 200 and data["files"][0]["uploadMode"] == "regular"


@pytest.mark.local_hub(token="secret")
def test_small_unread_bodies_are_discarded_and_the_connection_reused(local_hub):
    conn = http.client.HTTPConnection(urlsplit(local_hub.url).netloc, timeout=_TIMEOUT)
    try:
        conn.request(
            "POST", "/api/repos/create", body=json.dumps({"name": "x"}), headers={"Content-Type": "application/json"}
        )
        resp = conn.getresponse()
        assert resp.status == 401 and resp.getheader("Connection") is None
        resp.read()
        sock = conn.sock
        conn.request("GET", "/api/whoami-v2", headers={"Authorization": "Bearer secret"})
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["name"] == "local-user"
        assert conn.sock is sock  # same connection: the refused body was drained, not left in the stream
    finally:
        conn.close()


@pytest.mark.local_hub(token="secret")
def test_a_real_client_sending_a_big_unauthorized_body_reads_the_401(local_hub):
    """The server answers before reading, then keeps discarding input while the client is still
    sending: the client finishes its upload and reads the 401 (no connection reset)."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import get_session

    HfApi().create_repo(REPO)
    resp = get_session().post(
        f"{local_hub.url}/api/models/{REPO}/commit/main",
        content=b"\0" * (48 * 1024 * 1024),
        headers={"authorization": "Bearer wrong"},
    )
    assert resp.status_code == 401 and "Invalid credentials" in resp.json()["error"]


@pytest.mark.local_hub(max_json_size=4096, max_commit_size=64 * 1024)
def test_bodies_over_the_caps_get_413_without_being_read(local_hub):
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi()
    api.create_repo(REPO)
    with _connect(local_hub) as sock:  # declared over the cap: answered from the headers
        sock.sendall(_head("POST", "/api/repos/create", local_hub, Content_Length="4097") + b"{")
        status, headers, body = _response(sock)
        assert status == 413 and "4096 bytes" in body["error"] and headers["Connection"] == "close"
    with _connect(local_hub) as sock:  # chunked: refused as soon as the cap is passed, the rest never sent
        sock.sendall(_head("POST", f"/api/models/{REPO}/commit/main", local_hub, Transfer_Encoding="chunked"))
        for _ in range(5):
            sock.sendall(b"4000\r\n" + b"x" * 0x4000 + b"\r\n")  # 5 x 16 KiB > 64 KiB, no final chunk
        status, headers, body = _response(sock)
        assert status == 413 and headers["Connection"] == "close" and _closed_by_server(sock)
    # the real client: a regular-mode commit over the cap fails clearly, smaller ones go through
    with pytest.raises(HfHubHTTPError) as e:
        api.upload_file(path_or_fileobj=os.urandom(100_000), path_in_repo="big.dat", repo_id=REPO)
    assert e.value.response.status_code == 413 and "--lfs" in str(e.value)
    api.upload_file(path_or_fileobj=os.urandom(30_000), path_in_repo="small.dat", repo_id=REPO)
    assert "small.dat" in api.list_repo_files(REPO) and "big.dat" not in api.list_repo_files(REPO)


def test_missing_or_invalid_body_framing(local_hub):
    cases = [
        ({}, 411),  # a route that needs a body, without Content-Length or chunked
        ({"Content_Length": "abc"}, 400),
        ({"Content_Length": "-1"}, 400),
        ({"Content_Length": "5, 6"}, 400),
        ({"Transfer_Encoding": "gzip"}, 400),
    ]
    for headers, status in cases:
        with _connect(local_hub) as sock:
            sock.sendall(_head("POST", "/api/repos/create", local_hub, **headers))
            got, resp_headers, body = _response(sock)
            assert got == status, (headers, got, body)
            if status == 400:  # the body cannot be delimited: the connection ends
                assert resp_headers["Connection"] == "close" and _closed_by_server(sock)
    with _connect(local_hub) as sock:  # an optional body may be absent: a branch from main
        sock.sendall(_head("POST", "/api/repos/create", local_hub, Content_Length="14") + b'{"name": "r1"}')
        assert _response(sock)[0] == 200
        sock.sendall(_head("POST", "/api/models/local-user/r1/branch/dev", local_hub))
        assert _response(sock)[0] == 200


@pytest.mark.local_hub(token="secret", lfs=True, max_lfs_size=1024 * 1024)
def test_lfs_uploads_are_held_to_the_signed_size_and_the_cap(local_hub):
    from huggingface_hub import HfApi

    HfApi().create_repo(REPO)
    conn = http.client.HTTPConnection(urlsplit(local_hub.url).netloc, timeout=_TIMEOUT)

    def batch(*objects):
        conn.request(
            "POST",
            f"/{REPO}.git/info/lfs/objects/batch",
            headers={"Authorization": "Bearer secret"},
            body=json.dumps({"operation": "upload", "objects": [{"oid": o, "size": s} for o, s in objects]}),
        )
        resp = conn.getresponse()
        assert resp.status == 200
        return json.loads(resp.read())["objects"]

    data = os.urandom(512 * 1024)
    oid = hashlib.sha256(data).hexdigest()
    ok, too_big = batch((oid, len(data)), ("f" * 64, 2 * 1024 * 1024))
    assert too_big["error"]["code"] == 413 and "actions" not in too_big
    path = urlsplit(ok["actions"]["upload"]["href"])
    path = f"{path.path}?{path.query}"
    with _connect(local_hub) as sock:  # a Content-Length that is not the signed size: refused unread
        sock.sendall(_head("PUT", path, local_hub, Content_Length=str(10**10)) + data[:100])
        status, headers, _ = _response(sock, "PUT")
        assert status == 400 and headers["Connection"] == "close"
    with _connect(local_hub) as sock:  # chunked past the signed size: refused there
        sock.sendall(_head("PUT", path, local_hub, Transfer_Encoding="chunked"))
        for piece in (data, data):
            sock.sendall(b"%x\r\n" % len(piece) + piece + b"\r\n")
        assert _response(sock, "PUT")[0] == 413
    conn.request("PUT", path, body=data)
    resp = conn.getresponse()
    assert resp.status == 200 and resp.read() == b"{}"
    assert batch((oid, len(data)))[0].get("actions") is None  # stored
    conn.close()


@pytest.mark.local_hub(token="secret", lfs=True)
def test_client_round_trip_with_token_lfs_and_private_repo(local_hub, tmp_path):
    """create_repo / upload_folder (regular and LFS files) / snapshot_download through the
    access checks that now come before every body."""
    from huggingface_hub import HfApi, snapshot_download

    api = HfApi()
    api.create_repo(REPO, private=True)
    folder = _make_folder(tmp_path / "up")
    (folder / "weights.bin").write_bytes(os.urandom(11 * 1024 * 1024))  # >= 10 MB: LFS
    api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="upload")
    assert any(p.startswith("/_lfs/") for m, p in local_hub.requests if m == "PUT")
    got = snapshot_download(REPO)
    for f in ("config.json", "sub/data.txt", "sub/deeper/x.bin", "weights.bin"):
        assert open(os.path.join(got, f), "rb").read() == (folder / f).read_bytes(), f


def test_body_caps_must_be_positive(tmp_path):
    from ota_trainer.errors import ConfigError
    from ota_trainer.testing.local_hub import LocalHub

    with pytest.raises(ConfigError, match="max_commit_size"):
        LocalHub(tmp_path, max_commit_size=0)
