"""Pulls from a malicious registry (a real one on 127.0.0.1, misbehaving on purpose).

Whatever it sends, a pull ends in a one-line typed error or a whole model, reads no more than the
caps allow, writes nothing before it knows the disk can hold it, and leaves nothing behind.
"""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offload.models import registry
from offload.models.errors import BlobOverflow, DiskFull, RegistryError
from offload.models.layout import MAX_MANIFEST_BYTES, TEMP_PREFIX, open_temp, prune_stale
from offload.models.names import parse_name
from offload.models.store import Store
from offload.planner.errors import OffloadError
from tests.registry_server import MANIFEST_TYPE, RegistryServer, gguf_bytes, sha256
from tests.serve_process import ServeProcess

MODEL = "application/vnd.ollama.image.model"
CONFIG = "application/vnd.docker.container.image.v1+json"


def manifest(layers: list[dict], config: dict | None = None) -> bytes:
    cfg = config or {"mediaType": CONFIG, "digest": sha256(b"{}"), "size": 2}
    return json.dumps(
        {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": cfg, "layers": layers}
    ).encode()


def leftovers(root: Path) -> list[str]:
    """Anything a failed pull left: blobs (whole or partial), temporary files, manifests."""
    out = []
    for folder in (root / "blobs", root / "manifests"):
        if folder.is_dir():
            out += [str(p.relative_to(root)) for p in folder.rglob("*") if p.is_file()]
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_a_layer_longer_than_declared_is_cut_off_and_dropped(
    reg: RegistryServer, tmp_path: Path
) -> None:
    data = gguf_bytes(4096)
    reg.state.add_model("evil/long", "latest", [(MODEL, data)])
    reg.state.extra_bytes[sha256(data)] = 200 << 20  # declared 4 KB, streams 200 MB more
    t0 = time.monotonic()
    with pytest.raises(BlobOverflow, match=r"sent more than the 4096 bytes its manifest declares"):
        registry.pull(Store(tmp_path), f"{reg.host}/evil/long", insecure=True)
    assert time.monotonic() - t0 < 10
    assert reg.state.bytes_served < 50 << 20, "the client kept reading past the declared size"
    blob_gets = [p for m, p in reg.state.requests if m == "GET" and sha256(data) in p]
    assert len(blob_gets) == 1, "a registry that overflows was asked again"
    assert leftovers(tmp_path) == [f"blobs/{sha256(b'{}').replace(':', '-')}"]  # only the config


@pytest.mark.parametrize("content_length", [True, False])
def test_a_huge_manifest_is_refused_after_reading_at_most_the_cap(
    reg: RegistryServer, tmp_path: Path, content_length: bool
) -> None:
    data = gguf_bytes(4096)
    reg.state.add_model("evil/huge", "latest", [(MODEL, data)])
    reg.state.padded_manifests[("evil/huge", "latest")] = 300 << 20
    reg.state.no_content_length = not content_length
    rss0 = peak_rss_mib()
    with pytest.raises(
        RegistryError, match=f"more than the {MAX_MANIFEST_BYTES} bytes allowed|of 31"
    ):
        registry.pull(Store(tmp_path), f"{reg.host}/evil/huge", insecure=True)
    assert peak_rss_mib() - rss0 < 64, "reading the manifest took more memory than its cap"
    assert reg.state.manifest_bytes_served < 64 << 20
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("config", [b"[1, 2, 3]", b'"a string"', b"null", b"7", b"{not json"])
def test_a_config_that_is_not_an_object_is_refused(
    reg: RegistryServer, tmp_path: Path, config: bytes
) -> None:
    reg.state.add_model("evil/config", "latest", [(MODEL, gguf_bytes(4096))], config=config)
    with pytest.raises(RegistryError, match="sent config that is not a JSON dict"):
        registry.pull(Store(tmp_path), f"{reg.host}/evil/config", insecure=True)
    assert not [p for p in leftovers(tmp_path) if "manifests" in p]
    assert not Store(tmp_path).blob_path(sha256(config)).exists()


def test_a_model_layer_that_is_not_a_usable_gguf_is_refused(
    reg: RegistryServer, tmp_path: Path
) -> None:
    reg.state.add_model("evil/junk", "latest", [(MODEL, b"not a model at all" * 100)])
    with pytest.raises(RegistryError, match="sent a model layer offload refuses: wrong magic"):
        registry.pull(Store(tmp_path), f"{reg.host}/evil/junk", insecure=True)
    assert not [
        p
        for p in leftovers(tmp_path)
        if "sha256-" in p and "config" not in p and p.endswith("partial")
    ]


def test_a_declared_terabyte_is_refused_before_a_byte_is_written(
    reg: RegistryServer, tmp_path: Path
) -> None:
    if shutil.disk_usage(tmp_path).free >= 1 << 40:
        pytest.skip("this disk could hold a terabyte")
    digest = sha256(b"never sent")
    reg.state.manifests[("evil/tera", "latest")] = manifest(
        [{"mediaType": MODEL, "digest": digest, "size": 1 << 40}]
    )
    with pytest.raises(
        DiskFull,
        match=r"not enough disk space for .*evil/tera:latest: it needs 1.1 TB and .* are free",
    ) as err:
        registry.pull(Store(tmp_path), f"{reg.host}/evil/tera", insecure=True)
    assert err.value.http_status == 507
    assert leftovers(tmp_path) == []
    assert not [p for m, p in reg.state.requests if "blobs" in p], "a blob was requested"


@pytest.mark.parametrize(
    ("layer", "words"),
    [
        ({"size": 1 << 50}, "declares 1125899906842624 bytes, more than the"),
        ({"size": -1}, "has size -1"),
        ({"size": "12"}, "has size '12'"),
        ({"size": 1.5}, "has size 1.5"),
        ({"digest": "sha256:../../etc/passwd"}, "invalid digest"),
        ({"mediaType": "text/html"}, "not an Ollama layer"),
        ({"mediaType": 5}, "has media type 5"),
    ],
)
def test_manifests_of_the_wrong_shape_are_refused(
    reg: RegistryServer, tmp_path: Path, layer: dict, words: str
) -> None:
    good = {"mediaType": MODEL, "digest": sha256(b"x"), "size": 1}
    reg.state.manifests[("evil/shape", "latest")] = manifest([{**good, **layer}])
    with pytest.raises(RegistryError, match="sent a manifest offload cannot use") as err:
        registry.pull(Store(tmp_path), f"{reg.host}/evil/shape", insecure=True)
    assert words in str(err.value) and "\n" not in str(err.value)
    assert leftovers(tmp_path) == []


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=30),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5)
    ),
    max_leaves=20,
)
LAYER_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "mediaType": st.sampled_from([MODEL, CONFIG, "application/vnd.ollama.image.template", "x"])
        | JSON,
        "digest": st.sampled_from([sha256(b"a"), "sha256:" + "0" * 64, "md5:1", ""]) | JSON,
        "size": st.sampled_from([0, 1, 2**31, 2**40, 2**63, -5]) | JSON,
    },
)
MANIFESTS = st.one_of(
    JSON.map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries(
        {},
        optional={
            "schemaVersion": JSON,
            "config": LAYER_FIELDS | JSON,
            "layers": st.lists(LAYER_FIELDS | JSON, max_size=4) | JSON,
        },
    ).map(lambda v: json.dumps(v).encode()),
    st.binary(max_size=200),
)


@settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(raw=MANIFESTS)
def test_any_manifest_ends_in_a_typed_error_or_a_model(
    reg: RegistryServer, tmp_path_factory: pytest.TempPathFactory, raw: bytes
) -> None:
    root = tmp_path_factory.mktemp("store")
    reg.state.manifests[("gen/model", "latest")] = raw
    try:
        registry.pull(Store(root), f"{reg.host}/gen/model", insecure=True, retries=0, timeout_s=10)
    except OffloadError as e:
        assert "\n" not in str(e) and e.http_status in (400, 404, 502, 507), e
        assert not [p for p in leftovers(root) if "manifests" in p or p.endswith("-partial")]
        return
    Store(root).resolve(parse_name(f"{reg.host}/gen/model"))  # a pulled model must be usable


def test_stale_temp_files_and_partials_are_pruned_and_live_ones_kept(tmp_path: Path) -> None:
    store = Store(tmp_path)
    blobs = store.blobs_dir
    blobs.mkdir(parents=True)
    dead = blobs / f"{TEMP_PREFIX}dead"
    dead.write_bytes(b"x" * 1000)
    live_file, live = open_temp(blobs)  # a writer still at work holds its lock
    fresh = blobs / f"{TEMP_PREFIX}fresh"
    fresh.write_bytes(b"y")
    old_partial = blobs / ("sha256-" + "1" * 64 + "-partial")
    old_partial.write_bytes(b"z")
    (blobs / (old_partial.name + ".json")).write_text("{}")
    new_partial = blobs / ("sha256-" + "2" * 64 + "-partial")
    new_partial.write_bytes(b"z")
    long_ago = time.time() - 30 * 24 * 3600
    for p in (dead, live, old_partial):
        import os

        os.utime(p, (long_ago, long_ago))
    removed = prune_stale(tmp_path)
    assert sorted(p.name for p in removed) == sorted([dead.name, old_partial.name])
    assert live.exists() and fresh.exists() and new_partial.exists()
    assert not (blobs / (old_partial.name + ".json")).exists()
    live_file.close()


def test_pull_over_http_from_a_malicious_registry_is_a_one_line_502(
    reg: RegistryServer, tmp_path_factory: pytest.TempPathFactory
) -> None:
    data = gguf_bytes(8192)
    reg.state.add_model("evil/long", "latest", [(MODEL, data)])
    reg.state.extra_bytes[sha256(data)] = 100 << 20
    reg.state.add_model("evil/huge", "latest", [(MODEL, data)])
    reg.state.padded_manifests[("evil/huge", "latest")] = 100 << 20
    home = tmp_path_factory.mktemp("pull-home")
    with ServeProcess(home) as server:
        body = {"model": f"{reg.host}/library/none", "insecure": True, "stream": False}
        httpx.post(f"{server.url}/api/pull", json=body, timeout=30)  # warm-up
        # The first listing imports the embedded model; that is not the attack's doing.
        httpx.get(f"{server.url}/api/tags", timeout=120)
        with server.unharmed():
            for name in ("evil/long", "evil/huge"):
                body = {"model": f"{reg.host}/{name}", "insecure": True, "stream": False}
                r = httpx.post(f"{server.url}/api/pull", json=body, timeout=60)
                assert r.status_code == 502, r.text
                assert set(r.json()) == {"error"} and "\n" not in r.json()["error"]
                body["stream"] = True
                lines = httpx.post(
                    f"{server.url}/api/pull", json=body, timeout=60
                ).text.splitlines()
                assert "error" in json.loads(lines[-1]), lines[-1]
            r = httpx.get(f"{server.url}/api/tags", timeout=10)
            # Nothing of the registry's: only the embedded model a fresh store offers.
            assert r.status_code == 200 and [m["name"] for m in r.json()["models"]] == [
                "gemma3:270m"
            ]
        embedded = "manifests/registry.ollama.ai/library/gemma3/270m"
        assert not [
            p
            for p in leftovers(home / "models")
            if not p.startswith("blobs/sha256-") and p != embedded
        ]
