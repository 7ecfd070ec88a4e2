"""`--model org/repo[:QUANT]` against a local mock of the Hub (hub_mock.py; HF_ENDPOINT points at it).

The GGUF repository serves the cached SmolLM2 file under a Q4_K_M name, small junk files under
other quant names (only the choice is tested on them), and a 3-part split of SmolLM2 written by
gguf-py's own writer (llama.cpp's split layout). A model loaded from the Hub must give exactly
the greedy tokens of the same model loaded from its local path.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from pathlib import Path

import pytest

from conftest import BIN, ROOT
from hub_mock import MockHub, MockRepo

CACHE = Path(os.environ.get("SUPERNODE_CACHE", Path.home() / ".cache" / "supernode"))
SMOL = CACHE / "models" / "smollm2-135m.gguf"
LLAMA_DIR = ROOT / "tests" / "fixtures" / "hf" / "llama"
RETRIES = 3  # hub/mod.rs RETRIES: resumed attempts within one run
PROMPT = ["--prompt", "The capital of France is", "-n", "8", "--temperature", "0", "--json"]
TOKENS = ["--tokens", "1,2,3", "-n", "6", "--temperature", "0", "--json"]


def supernode(*args: str, env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN), *args, "--threads", "2"] if args[0] != "fetch" else [str(BIN), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def one_line_error(p: subprocess.CompletedProcess) -> str:
    assert p.returncode != 0, p.stdout
    lines = [l for l in p.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), p.stderr
    assert "panicked" not in p.stderr
    return lines[0]


def split_gguf(src: Path, out: Path, parts: int) -> list[Path]:
    """Writes `src` as a split GGUF with gguf-py's writer; returns the parts in order."""
    import gguf

    reader = gguf.GGUFReader(src)
    arch = reader.fields["general.architecture"].contents()
    per_part = -(-len(reader.tensors) // parts)
    writer = gguf.GGUFWriter(out, arch=arch, split_max_tensors=per_part)
    for f in reader.fields.values():
        if f.name == "general.architecture" or f.name.startswith("GGUF."):
            continue
        vtype = f.types[0]
        sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
    for t in reader.tensors:
        writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t in reader.tensors:
        writer.write_tensor_data(t.data)
    writer.close()
    files = sorted(out.parent.glob(out.stem + "-0000*-of-*.gguf"))
    assert len(files) == parts, files
    return files


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    if not SMOL.is_file():
        pytest.fail(f"{SMOL} is missing: run `supernode fetch smollm2-135m` first")
    d = tmp_path_factory.mktemp("hubfiles")
    junk = {}
    for q in ["Q8_0", "IQ2_XS"]:
        junk[q] = d / f"junk-{q}.gguf"
        junk[q].write_bytes(b"GGUF junk " + q.encode())
    readme = d / "README.md"
    readme.write_text("a model card\n")
    parts = split_gguf(SMOL, d / "smol-F16.gguf", 3)
    gguf_files = {
        "README.md": readme,
        "smol-Q4_K_M.gguf": SMOL,
        "smol-Q8_0.gguf": junk["Q8_0"],
        "smol-IQ2_XS.gguf": junk["IQ2_XS"],
        "mmproj-smol-f16.gguf": junk["Q8_0"],
    }
    for p in parts:
        gguf_files[f"split/{p.name}"] = p
    llama = {"config.json": LLAMA_DIR / "config.json", "model.safetensors": LLAMA_DIR / "model.safetensors"}
    mock = MockHub(
        {
            "test-org/smol-GGUF": MockRepo(gguf_files),
            "test-org/resume-GGUF": MockRepo({"smol.Q4_1.gguf": SMOL}),
            "test-org/tiny-llama": MockRepo({**llama, "README.md": readme}),
            "test-org/gated-llama": MockRepo(dict(llama), token="hf_test_secret"),
            # `main` holds junk under the GGUF's name; revision `v2` the real file.
            "test-org/rev-GGUF": MockRepo({"smol-Q4_K_M.gguf": junk["Q8_0"]}, revisions={"v2": {"smol-Q4_K_M.gguf": SMOL}}),
            "test-org/stall-GGUF": MockRepo({"stall.Q4_1.gguf": SMOL}),
            "test-org/slow-list": MockRepo(dict(llama)),
        }
    )
    mock.stalls.add("stall.Q4_1.gguf")
    mock.stall_info.add("test-org/slow-list")
    yield mock
    mock.close()


def dead_endpoint() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"http://127.0.0.1:{port}"


@pytest.fixture
def env(hub, tmp_path):
    e = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    # A trailing slash, as users write it, must not matter.
    e.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT=hub.url + "/", SUPERNODE_CACHE=str(tmp_path / "sn"))
    return e


@pytest.fixture(scope="module")
def reference():
    """Greedy output of the local SmolLM2 file and of the local safetensors fixture."""
    e = dict(os.environ)
    a = supernode("run", "--model", str(SMOL), *PROMPT, env=e)
    b = supernode("run", "--model", str(LLAMA_DIR), *TOKENS, env=e)
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    return {"smol": json.loads(a.stdout), "llama": json.loads(b.stdout)}


def test_no_tag_picks_q4_k_m_and_runs_like_the_local_file(hub, env, reference):
    p = supernode("run", "--model", "test-org/smol-GGUF", *PROMPT, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["smol"]
    assert hub.ranges("smol-Q4_K_M.gguf")
    assert not hub.ranges("smol-Q8_0.gguf")


def test_a_quant_tag_picks_its_file_case_insensitively(hub, env):
    p = supernode("fetch", "test-org/smol-GGUF:iq2_xs", env=env)
    assert p.returncode == 0, p.stderr
    path = Path(p.stdout.strip())
    assert path.name == "smol-IQ2_XS.gguf" and path.read_bytes() == b"GGUF junk IQ2_XS"
    assert str(path).startswith(env["HF_HOME"])


def test_a_split_gguf_is_downloaded_whole_joined_and_runs(hub, env, reference):
    p = supernode("run", "--model", "test-org/smol-GGUF:F16", *PROMPT, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["smol"]
    for i in (1, 2, 3):
        assert hub.ranges(f"split/smol-F16-0000{i}-of-00003.gguf")
    joined = list(Path(env["SUPERNODE_CACHE"]).rglob("smol-F16.gguf"))
    assert len(joined) == 1


def test_an_unknown_quant_lists_the_available_ones(env):
    line = one_line_error(supernode("run", "--model", "test-org/smol-GGUF:Q2_K", *PROMPT, env=env))
    for q in ["Q4_K_M", "Q8_0", "IQ2_XS", "F16"]:
        assert q in line, line
    assert "mmproj" not in line


def test_a_safetensors_repo_loads_as_its_directory(hub, env, reference):
    p = supernode("run", "--model", "test-org/tiny-llama", *TOKENS, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["llama"]
    assert not hub.ranges("README.md")


def test_a_missing_repo_is_a_one_line_404(env):
    line = one_line_error(supernode("run", "--model", "test-org/no-such-model", *TOKENS, env=env))
    assert "not found" in line and "test-org/no-such-model" in line, line


def test_a_gated_repo_asks_for_hf_token_and_works_with_it(env, reference):
    line = one_line_error(supernode("run", "--model", "test-org/gated-llama", *TOKENS, env=env))
    assert "HF_TOKEN" in line, line
    p = supernode("run", "--model", "test-org/gated-llama", *TOKENS, env={**env, "HF_TOKEN": "hf_test_secret"})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["llama"]


def resumed_starts(hub: MockHub, file: str) -> list[int]:
    return [int(r.split("=")[1].split("-")[0]) for r in hub.ranges(file) if r and r != "bytes=0-0"]


def test_a_dropped_download_resumes_within_the_run(hub, env, reference):
    hub.log.clear()
    hub.drops["smol.Q4_1.gguf"] = 1
    p = supernode("run", "--model", "test-org/resume-GGUF", *PROMPT, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["smol"]
    starts = resumed_starts(hub, "smol.Q4_1.gguf")
    assert starts[0] == 0 and 0 < starts[1] < SMOL.stat().st_size, starts


def test_a_failed_run_leaves_a_part_file_the_next_run_resumes(hub, env, reference):
    hub.log.clear()
    hub.drops["smol.Q4_1.gguf"] = RETRIES + 1
    p = supernode("run", "--model", "test-org/resume-GGUF", *PROMPT, env=env)
    assert p.returncode != 0 and "panicked" not in p.stderr, p.stderr
    *resumes, line = p.stderr.strip().splitlines()
    assert len(resumes) == RETRIES and all(r.endswith("; resuming") for r in resumes), p.stderr
    assert line.startswith("error: ") and "interrupted" in line and "again" in line, line
    (part,) = list(Path(env["HF_HOME"]).rglob("*.part"))
    kept = part.stat().st_size
    assert 0 < kept < SMOL.stat().st_size
    hub.log.clear()
    p = supernode("run", "--model", "test-org/resume-GGUF", *PROMPT, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["smol"]
    assert resumed_starts(hub, "smol.Q4_1.gguf") == [kept]


def test_offline_runs_from_the_cache(hub, env, reference):
    p = supernode("run", "--model", "test-org/tiny-llama", *TOKENS, env=env)
    assert p.returncode == 0, p.stderr
    n = len(hub.log)
    p = supernode("run", "--model", "test-org/tiny-llama", *TOKENS, env={**env, "HF_HUB_OFFLINE": "1"})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["llama"]
    assert len(hub.log) == n, hub.log[n:]
    # The Hub unreachable: the cached copy is used without being asked for.
    p = supernode("run", "--model", "test-org/tiny-llama", *TOKENS, env={**env, "HF_ENDPOINT": dead_endpoint()})
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["llama"]
    assert "cannot be reached" in p.stderr


def test_offline_without_the_cache_says_what_is_missing(env):
    line = one_line_error(supernode("run", "--model", "test-org/tiny-llama", *TOKENS, env={**env, "HF_HUB_OFFLINE": "1"}))
    assert "HF_HUB_OFFLINE" in line and "cache" in line, line
    line = one_line_error(supernode("run", "--model", "test-org/tiny-llama", *TOKENS, env={**env, "HF_ENDPOINT": dead_endpoint()}))
    assert "could not reach" in line and "HF_HUB_OFFLINE" in line, line


def test_a_revision_downloads_that_revision_and_is_cached_apart(hub, env, reference):
    hub.log.clear()
    p = supernode("run", "--model", "test-org/rev-GGUF@v2", *PROMPT, env=env)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["smol"]
    assert hub.ranges("smol-Q4_K_M.gguf", rev="v2") and not hub.ranges("smol-Q4_K_M.gguf")
    assert any(path.endswith("/revision/v2") for (_, path, _) in hub.log), hub.log
    # `main` is another commit with other bytes under the same name.
    p = supernode("fetch", "test-org/rev-GGUF", env=env)
    assert p.returncode == 0, p.stderr
    assert Path(p.stdout.strip()).read_bytes() == b"GGUF junk Q8_0"
    # Offline, each revision comes from its own snapshot.
    offline = {**env, "HF_HUB_OFFLINE": "1"}
    p = supernode("run", "--model", "test-org/rev-GGUF@v2:Q4_K_M", *PROMPT, env=offline)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["smol"]
    p = supernode("fetch", "test-org/rev-GGUF", env=offline)
    assert p.returncode == 0 and Path(p.stdout.strip()).read_bytes() == b"GGUF junk Q8_0", p.stderr


def test_an_unknown_revision_is_a_one_line_404(env):
    line = one_line_error(supernode("run", "--model", "test-org/rev-GGUF@v9", *PROMPT, env=env))
    assert "not found" in line and "revision v9" in line, line


def test_a_stalled_download_gives_up_and_keeps_its_part_file(hub, env):
    import time

    t0 = time.monotonic()
    p = supernode("run", "--model", "test-org/stall-GGUF", *PROMPT, env={**env, "HF_HUB_DOWNLOAD_TIMEOUT": "2"})
    took = time.monotonic() - t0
    line = one_line_error(p)
    assert "HF_HUB_DOWNLOAD_TIMEOUT" in line and "stall.Q4_1.gguf" in line and "again" in line, line
    assert took < hub.stall_secs, took
    (part,) = list(Path(env["HF_HOME"]).rglob("*.part"))
    assert 0 < part.stat().st_size < SMOL.stat().st_size


def test_a_stalled_file_list_gives_up(hub, env):
    import time

    t0 = time.monotonic()
    p = supernode("run", "--model", "test-org/slow-list", *TOKENS, env={**env, "HF_HUB_ETAG_TIMEOUT": "2"})
    took = time.monotonic() - t0
    line = one_line_error(p)
    assert "could not reach" in line and "test-org/slow-list" in line, line
    assert took < hub.stall_secs, took


def test_an_existing_relative_path_with_a_slash_is_still_a_path(env, reference):
    p = supernode(
        "run", "--model", "tests/fixtures/hf/llama", *TOKENS, env={**env, "HF_ENDPOINT": dead_endpoint()}, cwd=ROOT
    )
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == reference["llama"]


def test_serve_names_a_hub_model_by_its_hub_name(env):
    import httpx

    proc = subprocess.Popen(
        [str(BIN), "serve", "--model", "test-org/tiny-llama", "--port", "0", "--threads", "2"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = None
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"listening on (http://\S+)", line)
            if m:
                url = m.group(1)
                break
        assert url, f"the server did not start (exit code {proc.poll()})"
        models = httpx.get(url + "/v1/models", timeout=30).json()
        assert [m["id"] for m in models["data"]] == ["test-org/tiny-llama"]
    finally:
        proc.terminate()
        proc.wait(60)
