"""inference.fetch and inference.sources on their own: the one copy loop, the deadline, local reads,
and the http details the store-level tests in tests/test_lora_store.py do not reach (raw bodies, address fallback,
IPv6 pinning, CA bundles). Loopback servers only (tests/servers.py), as there.
"""

from __future__ import annotations

import ast
import errno
import gzip
import io
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from runpod.serverless.utils import rp_ssrf  # its first import takes ~2 s: not inside timed tests

from inference import fetch as fetch_module
from inference import sources as sources_module
from inference.fetch import Deadline, FetchError, checked_addresses, copy_capped
from inference.sources import fetch_to_file, read_local
from tests import servers
from tests.servers import FileServer, S3Server

DATA = bytes(range(256)) * 64  # 16 KiB


@pytest.fixture
def www(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    with FileServer(root) as server:
        server.add("data.bin", DATA)
        yield server


def fetch(url: str, **kwargs) -> bytes:
    sink = io.BytesIO()
    options = dict(allow_private=True, max_bytes=1 << 20, timeout_s=5.0)
    options.update(kwargs)
    assert fetch_to_file(url, sink, **options) == len(sink.getvalue())
    return sink.getvalue()


def fetch_error(url: str, **kwargs) -> FetchError:
    with pytest.raises(FetchError) as err:
        fetch(url, **kwargs)
    return err.value


# -- the copy loop ---------------------------------------------------------------------------------


def test_copy_capped_writes_up_to_the_cap_and_never_the_chunk_past_it():
    sink = io.BytesIO()
    assert copy_capped([b"abc", b"", b"de"], sink, max_bytes=5, deadline=None, source="here") == 5
    assert sink.getvalue() == b"abcde"
    sink = io.BytesIO()
    with pytest.raises(FetchError) as err:
        copy_capped([b"abc", b"def"], sink, max_bytes=5, deadline=Deadline(60), source="here")
    assert err.value.refused and "larger than the 5 bytes allowed" in err.value.message
    assert sink.getvalue() == b"abc"


def test_copy_capped_checks_the_deadline_after_every_chunk():
    def slow_chunks():
        for _ in range(100):
            time.sleep(0.02)
            yield b"x"

    sink = io.BytesIO()
    started = time.monotonic()
    with pytest.raises(FetchError) as err:
        copy_capped(slow_chunks(), sink, max_bytes=1000, deadline=Deadline(0.2), source="somewhere")
    assert time.monotonic() - started < 0.5
    assert err.value.kind == "failed"
    assert err.value.message == "the download from somewhere took longer than 0.2 s and was abandoned"


def test_copy_capped_lets_write_errors_through():
    """A full disk is the service's trouble, not the source's: it must not become a FetchError."""
    class FullDisk:
        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError) as err:
        copy_capped([b"abc"], FullDisk(), max_bytes=10, deadline=None, source="here")
    assert not isinstance(err.value, FetchError) and err.value.errno == errno.ENOSPC


# -- local files -----------------------------------------------------------------------------------


def test_read_local_reads_paths_and_file_urls(tmp_path):
    source = tmp_path / "dir with space" / "f%41.bin"
    source.parent.mkdir()
    source.write_bytes(DATA)
    for form in (str(source), source, source.as_uri(), "file://localhost" + source.as_uri()[len("file://"):]):
        sink = io.BytesIO()
        assert read_local(form, sink, max_bytes=len(DATA)) == len(DATA) and sink.getvalue() == DATA


def test_read_local_errors(tmp_path, monkeypatch):
    directory = tmp_path / "d"
    directory.mkdir()
    big = tmp_path / "big.bin"
    big.write_bytes(DATA)

    def error(source, max_bytes=1 << 20) -> FetchError:
        sink = io.BytesIO()
        with pytest.raises(FetchError) as err:
            read_local(source, sink, max_bytes=max_bytes)
        assert sink.getvalue() == b""
        return err.value

    assert error(tmp_path / "nope").message == f"no such file: {tmp_path / 'nope'}"
    assert error(directory).message == f"{directory} is a directory, not a file"
    too_big = error(big, max_bytes=len(DATA) - 1)
    assert too_big.refused and "more than the" in too_big.message
    assert error("file://elsewhere/etc/passwd").refused
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert "not a regular file" in error(fifo).message  # refused before open(), which would block

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(sources_module, "open", denied, raising=False)  # tests run as root: chmod would not do
    assert error(big).message == f"cannot read {big}: permission denied"


def test_read_local_growing_past_the_cap_while_read_is_refused(tmp_path, monkeypatch):
    """The size is checked before reading and again while reading (a file that grows meanwhile)."""
    path = tmp_path / "grows.bin"
    path.write_bytes(b"x" * 10)
    real_open = open

    def open_then_grow(*args, **kwargs):
        file = real_open(*args, **kwargs)
        path.write_bytes(b"x" * 100)
        return file

    monkeypatch.setattr(sources_module, "open", open_then_grow, raising=False)
    with pytest.raises(FetchError) as err:
        read_local(path, io.BytesIO(), max_bytes=50)
    assert err.value.refused and "larger than" in err.value.message


# -- http: deadline, stalls, raw bodies ------------------------------------------------------------


def test_a_drip_is_cut_off_at_the_first_receive_past_the_deadline(www):
    """A byte every 50 ms never trips the 5 s read timeout; the deadline is checked per receive."""
    www.behave["/data.bin"] = servers.drip(0.05, chunk=1, total_s=8)
    started = time.monotonic()
    error = fetch_error(www.url("data.bin"), timeout_s=5.0, deadline_s=0.4)
    assert 0.35 < time.monotonic() - started < 1.0
    assert error.message == "the download from 127.0.0.1 took longer than 0.4 s and was abandoned"


def test_a_silent_server_past_the_deadline_ends_within_the_time_that_was_left(www):
    """The read timeout is never longer than the time left when the request was sent."""
    www.behave["/data.bin"] = servers.stall(5)
    started = time.monotonic()
    error = fetch_error(www.url("data.bin"), timeout_s=3.0, deadline_s=0.3)
    assert time.monotonic() - started < 1.0
    assert "took longer than 0.3 s" in error.message


def test_a_silent_server_before_the_deadline_is_a_read_timeout(www):
    www.behave["/data.bin"] = servers.stall(5)
    started = time.monotonic()
    error = fetch_error(www.url("data.bin"), timeout_s=0.3, deadline_s=30)
    assert time.monotonic() - started < 1.5
    assert error.message == "timed out after 0.3 s waiting for 127.0.0.1"


def test_a_shared_deadline_bounds_several_fetches(www):
    deadline = Deadline(0.5)
    assert fetch(www.url("data.bin"), deadline=deadline) == DATA
    www.behave["/data.bin"] = servers.drip(0.05, chunk=1, total_s=8)
    started = time.monotonic()
    error = fetch_error(www.url("data.bin"), deadline=deadline, deadline_s=60)  # `deadline` wins
    assert time.monotonic() - started < 1.0 and "took longer than 0.5 s" in error.message
    assert "took longer" in fetch_error(www.url("data.bin"), deadline=deadline).message  # spent: not dialled again


def test_bodies_are_stored_raw_never_decoded(www):
    """A gzip bomb stays a small gzip file: identity is asked for and nothing is decompressed."""
    bomb = gzip.compress(b"\0" * (8 << 20))
    www.behave["/bomb"] = servers.status(200, bomb, {"Content-Encoding": "gzip"})
    assert fetch(www.url("bomb"), max_bytes=len(bomb)) == bomb
    assert www.requests[-1].headers["Accept-Encoding"] == "identity"


def test_more_than_declared_keeps_the_declared_length_and_less_is_an_error(www):
    www.behave["/data.bin"] = servers.more_than_declared
    assert fetch(www.url("data.bin")) == DATA[: len(DATA) // 2]
    www.behave["/data.bin"] = servers.close_half_way
    error = fetch_error(www.url("data.bin"))
    assert error.message == f"127.0.0.1 closed the connection before sending the whole body of {len(DATA)} bytes"
    assert error.status == 200


# -- http: addresses ---------------------------------------------------------------------------------


def test_only_connection_errors_move_on_to_the_next_address(www, monkeypatch):
    """127.0.0.2 refuses connections on this port (nothing listens there): the next address is tried.
    An HTTP answer, even a 500, is final."""
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: ["127.0.0.2", "127.0.0.1"])
    assert fetch(f"http://two.invalid:{www.port}/data.bin") == DATA
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: ["127.0.0.1", "127.0.0.1"])
    www.behave["/data.bin"] = servers.status(500)
    assert fetch_error(f"http://two.invalid:{www.port}/data.bin").status == 500
    assert www.hits["/data.bin"] == 2  # one per fetch
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: ["127.0.0.2"])
    error = fetch_error(f"http://none.invalid:{www.port}/data.bin")
    assert error.message == "cannot connect to none.invalid: connection refused"


def test_rp_ssrf_itself_refuses_ipv4_mapped_addresses_and_6to4_is_checked_here():
    assert not rp_ssrf.is_safe_address("::ffff:127.0.0.1") and not rp_ssrf.is_safe_address("::ffff:10.0.0.1")
    assert rp_ssrf.is_safe_address("2002:a9fe:a9fe::1"), "if rp_ssrf refuses 6to4 now, our extra check can go"
    for address in ("::ffff:127.0.0.1", "2002:a9fe:a9fe::1", "2002:7f00:1::1"):
        with pytest.raises(FetchError) as err:
            checked_addresses(address, 80, allow_private=False)
        assert err.value.refused and f"non-public address {address}" in err.value.message


def _ipv6_server(answer: bytes):
    """A one-request HTTP server on [::1]: returns (port, the request it received, its thread)."""
    listener = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    listener.bind(("::1", 0))
    listener.listen(1)
    received = []

    def serve():
        with listener:
            conn, _ = listener.accept()
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                received.append(data)
                conn.sendall(answer)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return listener.getsockname()[1], received, thread


def test_an_ipv6_address_is_dialled_with_its_brackets_and_the_name_kept(monkeypatch):
    try:
        port, received, thread = _ipv6_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: ["::1"])
    assert fetch(f"http://six.invalid:{port}/x?q=1") == b"ok"
    thread.join(timeout=5)
    request = received[0].decode()
    assert request.startswith("GET /x?q=1 HTTP/1.1\r\n")
    assert f"\r\nHost: six.invalid:{port}\r\n" in request


def test_an_ipv6_literal_url(monkeypatch):
    try:
        port, received, thread = _ipv6_server(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    assert fetch(f"http://[::1]:{port}/x") == b"ok"
    thread.join(timeout=5)
    assert f"\r\nHost: [::1]:{port}\r\n" in received[0].decode()
    assert "non-public address ::1" in fetch_error(f"http://[::1]:{port}/x", allow_private=False).message


def test_ssl_cert_file_is_honoured_too(tmp_path, monkeypatch):
    pytest.importorskip("cryptography")
    from tests.servers import make_tls_files

    tls = make_tls_files(tmp_path / "tls", hostnames=("lora.invalid",), ips=())
    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: ["127.0.0.1"])
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_DIR"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls.ca))
    with FileServer(tmp_path / "tls", tls=tls) as server:
        server.add("data.bin", DATA)
        assert fetch(f"https://lora.invalid:{server.port}/data.bin") == DATA


@pytest.mark.parametrize("url, needle", [
    ("http://lora.invalid:99999/x", "invalid port"),
    ("http://lora.invalid:abc/x", "not a valid URL"),
    ("http://[::1/x", "not a valid URL"),
    ("http:///x", "no host"),
    ("gopher://lora.invalid/x", "unsupported URL scheme gopher:"),
])
def test_malformed_urls_are_refused(url, needle):
    error = fetch_error(url)
    assert error.refused and needle in error.message


def test_any_url_string_gives_bytes_or_a_fetch_error(monkeypatch):
    """Whatever string a request carries: a FetchError, never another exception (a 500). Every host
    resolves to 127.0.0.1, where port 80 and 443 refuse or the guard does; s3 never gets a client."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    monkeypatch.setattr(fetch_module, "resolve", lambda host, port: ["127.0.0.1"])

    def no_s3():
        raise FetchError("no s3 here")

    prefixes = st.sampled_from(["http://", "https://", "HTTP://", "http:", "s3://", "http://[", "http://[::1",
                                "http://a.b:", "http://user@", "https://xn--", ""])

    @settings(max_examples=int(os.environ.get("SDXL_LORA_FUZZ_EXAMPLES", "300")), deadline=None,
              derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    @given(prefixes, st.text(max_size=40), st.booleans())
    def check(prefix, rest, allow_private):
        try:
            fetch_to_file(prefix + rest, io.BytesIO(), allow_private=allow_private, max_bytes=100, timeout_s=0.5,
                          deadline_s=2, s3_client_factory=no_s3)
        except FetchError:
            pass

    check()


def test_no_log_line_shows_the_query_string(www, caplog):
    """Presigned URLs carry credentials in the query string (httpx's Client logs every URL at INFO)."""
    caplog.set_level("DEBUG")
    assert fetch(www.url("data.bin?X-Amz-Signature=secret123")) == DATA
    fetch_error(www.url("missing?X-Amz-Signature=secret123"))
    assert "secret123" not in caplog.text


def test_a_garbage_answer_is_a_fetch_error():
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve():
        with listener:
            conn, _ = listener.accept()
            with conn:
                conn.recv(65536)
                conn.sendall(b"SSH-2.0-OpenSSH_9.6\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    error = fetch_error(f"http://127.0.0.1:{listener.getsockname()[1]}/x")
    thread.join(timeout=5)
    assert error.message == "download from 127.0.0.1 failed: not a valid HTTP answer"


def imported_packages(module) -> set[str]:
    tree = ast.parse(Path(module.__file__).read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    return imported | {node.module.split(".")[0] for node in ast.walk(tree)
                       if isinstance(node, ast.ImportFrom) and node.module}


def test_no_requests_in_our_code():
    """rp_ssrf imports requests for itself; the fetch goes through httpx only (and no watchdog thread)."""
    assert not imported_packages(fetch_module) & {"requests", "urllib3", "threading"}
    assert not imported_packages(sources_module) & {"requests", "urllib3"}


def test_the_url_schemes_are_decided_in_sources_alone():
    """No other module of the service lists the schemes it accepts (issue 26: it was three places)."""
    root = Path(sources_module.__file__).parent
    for path in root.glob("*.py"):
        if path.name != "sources.py":
            text = path.read_text()
            scheme_lines = [line for line in text.splitlines() if "scheme" in line]
            assert '"s3://"' not in text and not any('"s3"' in line for line in scheme_lines), path.name
            assert not any(f'"{scheme}://"' in text for scheme in ("https", "http")), path.name


# -- s3 --------------------------------------------------------------------------------------------


def test_s3_goes_through_the_same_loop(monkeypatch):
    with S3Server(monkeypatch) as s3:
        url = s3.put("bucket", "k/data.bin", DATA)
        client = sources_module.make_s3_client(s3.endpoint, timeout_s=5)
        assert fetch(url, s3_client_factory=lambda: client) == DATA
        error = fetch_error(url, s3_client_factory=lambda: client, max_bytes=len(DATA) - 1)
        assert error.refused and "more than the" in error.message
        error = fetch_error(url, s3_client_factory=lambda: client, deadline=Deadline(0))
        assert error.message == "the download from s3://bucket/k/data.bin took longer than 0 s and was abandoned"
