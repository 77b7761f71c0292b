"""A job's webhook (`--notify`, REST `notify`) behind basic authentication: the user and password
of its URL, on a real HTTP server."""

from __future__ import annotations

import base64
import logging
import socket

import pytest

from quantselect.domain.candidates import resolve_candidates
from quantselect.domain.dataset import load_dataset
from quantselect.domain.results import JobSpec, validate_notify
from quantselect.errors import ForbiddenError, InputError
from quantselect.service import Service, post_json
from tests.fixtures.common import EXAMPLES
from tests.fixtures.hooks import Hook


def basic(userinfo: bytes) -> str:
    return "Basic " + base64.b64encode(userinfo).decode()


def test_a_webhook_url_s_user_and_password_are_sent_as_basic_auth(monkeypatch, caplog):
    """As curl and requests do: `Authorization: Basic base64(user:password)`, both %-decoded (a
    password may hold '@', ':' or '/', which the URL must escape), and the request goes to the URL
    without them (its Host, a proxy's request line). Before, urllib took `user:pass@host` for the
    host and posted nothing."""
    caplog.set_level(logging.DEBUG)
    hook = Hook(auth=basic(b"bot:p@ss:w/rd"))
    url = f"http://bot:p%40ss%3Aw%2Frd@127.0.0.1:{hook.port}/hooks/T000/B000"
    try:
        assert validate_notify(url) == url
        assert post_json(url, {"n": 1}, "one", attempts=1) and hook.posted == [{"n": 1}]
        assert hook.received[0][0] == "/hooks/T000/B000"
        assert hook.received[0][1]["Host"] == f"127.0.0.1:{hook.port}"
        assert hook.received[0][1]["Authorization"] == basic(b"bot:p@ss:w/rd")
        # the job's end, as its driver announces it: the posted job shows no user or password
        svc = Service()
        spec = JobSpec(model="demo", model_path="demo", dataset=load_dataset(EXAMPLES / "piqa-300.jsonl", limit=2),
                       candidates=resolve_candidates([]), notify=url)
        job = svc.repo.create_job(spec)
        svc.repo.finish_job(job.id, "failed", error="it broke")
        svc._announce_end(job.id)
        assert len(hook.posted) == 2 and hook.posted[1]["job"]["notify"] == f"http://127.0.0.1:{hook.port}/…"
        # a wrong password: the hook's 401, logged without the URL's user and password
        wrong = url.replace("w%2Frd", "w%2Fro")
        assert not post_json(wrong, {"n": 2}, "two", attempts=1) and len(hook.posted) == 2
        assert f"could not post two to http://127.0.0.1:{hook.port}/…: 401 Unauthorized" in caplog.text
        # a user alone (a token), or a password alone (ntfy's token with no user), UTF-8 %-escaped
        for userinfo, sent in (("tok3n", b"tok3n:"), (":tk_%C3%A4", b":tk_\xc3\xa4")):
            other = Hook(auth=basic(sent))
            try:
                assert post_json(f"http://{userinfo}@127.0.0.1:{other.port}/t", {"n": 3}, "three", attempts=1)
                assert other.posted == [{"n": 3}]
            finally:
                other.close()
        # through a proxy, which connects for us: the URL it is asked for has no user or password
        proxy = Hook()
        monkeypatch.setenv("http_proxy", f"http://127.0.0.1:{proxy.port}")
        monkeypatch.setenv("no_proxy", "")
        try:
            assert post_json(url, {"n": 4}, "four", attempts=1) and proxy.posted == [{"n": 4}]
            assert proxy.received[0][0] == f"http://127.0.0.1:{hook.port}/hooks/T000/B000"
            assert proxy.received[0][1]["Authorization"] == basic(b"bot:p@ss:w/rd")
        finally:
            proxy.close()
        for secret in ("p@ss", "p%40ss", "w/rd", "w%2Frd", "w%2Fro", "tok3n", "tk_", basic(b"bot:p@ss:w/rd")[6:]):
            assert secret not in caplog.text
    finally:
        hook.close()


def test_a_webhook_url_s_host_is_never_escaped_its_user_may_be(monkeypatch, caplog):
    """Only the user and password may carry %-escapes: urllib decodes a host after the checks read it
    (a proxy would be asked for 169.254.169.254). An '@' escaped in the user is the user's: the
    post goes to the host after the last '@', which the checks read."""
    caplog.set_level(logging.DEBUG)
    for url in ("https://u:p%40ss@169%2E254%2E169%2E254/latest", "http://u:p@169.254.169.%32%35%34/",
                "https://bot:pa55@hooks%2Eslack.com/services/T/B/X", "http://u%40x:p%3A@[fe80::1%25eth0]/"):
        with pytest.raises(InputError, match=r"^notify '[^']+': write its host without %-escapes$") as e:
            validate_notify(url, None if "slack" not in url else ("hooks.slack.com",))
        assert "pa55" not in str(e.value) and "p%40ss" not in str(e.value)
    with pytest.raises(ForbiddenError, match=r"^notify 'https://10.0.0.8/…': 10.0.0.8 is not a host") as e:
        validate_notify("https://bot:pa55@10.0.0.8/h", ("hooks.slack.com",))
    with pytest.raises(ForbiddenError, match="169.254.169.254 is a link-local or cloud metadata address"):
        validate_notify("http://bot:pa55@169.254.169.254/latest/meta-data/")
    for url in ("http://[::1/h", "https://u:pa55@[zz]/h"):  # before, urlsplit's ValueError, uncaught
        with pytest.raises(InputError, match=r"^notify 'https?…': give an http\(s\) URL to post the job's end to"):
            validate_notify(url)
        assert not post_json(url, {"n": 0}, "zero", attempts=1)
    assert "could not post zero to http…: not a URL" in caplog.text and "pa55" not in caplog.text
    url = "https://x%40169.254.169.254@hooks.slack.com/services/T/B/X"
    assert validate_notify(url, ("hooks.slack.com",)) == url

    real = socket.getaddrinfo

    def dns(host, *args, **kwargs):  # names as a DNS server could answer them
        assert host in ("hooks.example", "127.0.0.1"), host
        return real({"hooks.example": "127.0.0.1"}.get(host, host), *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", dns)
    hook = Hook()
    try:
        assert post_json(f"http://x%40169.254.169.254@hooks.example:{hook.port}/h", {"n": 1}, "one", attempts=1)
        assert hook.received[0][1]["Host"] == f"hooks.example:{hook.port}"
        assert hook.received[0][1]["Authorization"] == basic(b"x@169.254.169.254:")
        # an error reaching a hook names neither user nor password
        hook.close()
        assert not post_json(f"http://bot:pa55@hooks.example:{hook.port}/h", {"n": 2}, "two", attempts=1)
        assert f"could not post two to http://hooks.example:{hook.port}/…: " in caplog.text
        assert "pa55" not in caplog.text and "bot" not in caplog.text
    finally:
        hook.close()
