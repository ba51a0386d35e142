"""Functions end to end on a real `hackboot serve`: the API uploads code, the machine's invoker runs it in
bubblewrap sandboxes, and every trigger reaches it — the invoke call (sync and async), a function URL, a
schedule, an object uploaded to the cloud's S3 (boto3), a queue. Retries and dead letters, throttling, and
another project's function (404) too. The test process opens the server's database only to move a
schedule's next period to now (instead of waiting for the minute) and to read what the loops wrote.
"""

from __future__ import annotations

import io
import json
import shutil
import time
import uuid
import zipfile
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import httpx
import pytest
from botocore.config import Config
from sqlalchemy import update

from hackboot.core.config import reset_settings_cache
from hackboot.core.db import dispose_engine, session_scope, utcnow
from hackboot.functions.models import FunctionTrigger
from hackboot.functions.runtimes import detect
from hackboot.sdk import ApiError, Client
from tests.support import Cloud, make_cloud

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap is not installed (run `make deps`)"),
    pytest.mark.xdist_group("functions-e2e"),
]

PYTHON = next((r.name for r in detect() if r.language == "python"), "python3")
NODE = next((r.name for r in detect() if r.language == "nodejs"), None)

APP = '''
import json, os

calls = 0

def handler(event, context):
    global calls
    calls += 1
    if isinstance(event, dict) and event.get("fail"):
        raise ValueError("asked to fail")
    print("got", json.dumps(event))
    return {"echo": event, "calls": calls, "request_id": context.aws_request_id if hasattr(context, "aws_request_id")
            else getattr(context, "request_id", ""), "greeting": os.environ.get("GREETING", "")}

def web(event, context):
    name = (event.get("queryStringParameters") or {}).get("name", "world")
    return {"statusCode": 201, "headers": {"content-type": "text/plain", "x-path": event["rawPath"]},
            "body": f"hello {name} via {event['requestContext']['http']['method']}"}

def always_fails(event, context):
    raise RuntimeError("nope")
'''


def wait_for(what: str, cond: Callable[[], Any], timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def zipped(files: dict[str, str]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return buf.getvalue()


@pytest.fixture(scope="module")
def fncloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cloud]:
    state = tmp_path_factory.mktemp("functions")
    cloud = make_cloud(state, HACKBOOT_RUN_LOCAL_AGENT="false", HACKBOOT_FUNCTIONS_POLL_INTERVAL_S="0.2",
                       HACKBOOT_FUNCTIONS_PROJECT_CONCURRENCY="4")
    cloud.start()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HACKBOOT_STATE_DIR", str(state))
        mp.setenv("HACKBOOT_DATABASE_URL", "")
        mp.setenv("HACKBOOT_CONFIG", str(state / "none.toml"))
        reset_settings_cache()
        dispose_engine()
        try:
            yield cloud
        finally:
            dispose_engine()
            cloud.stop()
    reset_settings_cache()


@pytest.fixture(scope="module")
def client(fncloud: Cloud) -> Client:
    admin = fncloud.admin_client_unscoped()
    project = admin.projects.create(f"fn-{uuid.uuid4().hex[:6]}")
    return fncloud.client(project=project["id"])


@pytest.fixture(scope="module")
def fn(client: Client) -> dict[str, Any]:
    f = client.functions.create(f"echo-{uuid.uuid4().hex[:6]}", PYTHON, "app.handler",
                                environment={"GREETING": "bonjour"}, timeout_s=10)
    client.functions.upload_code(f["id"], zipped({"app.py": APP}))
    return f


def invocations(client: Client, fn_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The function's invocation records with their logs (every page of the logs API)."""
    out: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.functions.logs(fn_id, after=after)
        out += page["items"]
        if not page["items"] or not page.get("next_after"):
            break
        after = page["next_after"]
    return [i for i in out if kind is None or i["trigger_kind"] == kind]


def test_invoke_sync_warm_and_logged(client: Client, fn: dict[str, Any]) -> None:
    first = client.functions.invoke(fn["id"], {"n": 1})
    assert first["outcome"] == "ok", first
    assert first["result"]["echo"] == {"n": 1} and first["result"]["greeting"] == "bonjour"
    second = client.functions.invoke(fn["id"], {"n": 2})
    assert second["result"]["calls"] == first["result"]["calls"] + 1, "the warm sandbox was reused"
    assert first["cold"] and not second["cold"]
    failed = client.functions.invoke(fn["id"], {"fail": True})
    assert failed["outcome"] == "error" and "asked to fail" in (failed["error"] or "")
    # Records are written off the request path (in batches): they follow within moments.
    records = wait_for("the records", lambda: (r := invocations(client, fn["id"], "api")) and
                       {x["outcome"] for x in r} >= {"ok", "error"} and r)
    assert any('got {"n": 1}' in (r.get("logs") or "") for r in records), "stdout is captured per invocation"


def test_invocations_are_counted_in_metrics(fncloud: Cloud, client: Client, fn: dict[str, Any]) -> None:
    # Its own invocations: another test of the module restarts the server (and its counters) and the order
    # of the module's tests is not fixed under xdist.
    for n in range(2):
        assert client.functions.invoke(fn["id"], {"n": n})["outcome"] == "ok"
    scrape = httpx.get(fncloud.url + "/metrics", headers={"Authorization": f"Bearer {fncloud.admin_token}"}).text
    ok = [line for line in scrape.splitlines() if line.startswith("hackboot_function_invocations_total{")
          and f'function="{fn["id"]}"' in line and 'outcome="ok"' in line and 'trigger="api"' in line]
    assert ok and sum(float(line.rsplit(" ", 1)[1]) for line in ok) >= 2, scrape[-2000:]
    durations = [line for line in scrape.splitlines() if line.startswith("hackboot_function_duration_seconds_count{")
                 and f'function="{fn["id"]}"' in line]
    assert durations and float(durations[0].rsplit(" ", 1)[1]) >= 2


def test_a_function_url_maps_the_request_and_the_response(fncloud: Cloud, client: Client, fn: dict[str, Any]) -> None:
    web = client.functions.create(f"web-{uuid.uuid4().hex[:6]}", PYTHON, "app.web")
    client.functions.upload_code(web["id"], zipped({"app.py": APP}))
    trig = client.functions.add_trigger(web["id"], "http")
    url = fncloud.url + trig["url_path"] if "url_path" in trig else trig["url"]
    answer = httpx.post(url.rstrip("/") + "/some/path?name=ada", content=b"x")
    assert answer.status_code == 201, answer.text
    assert answer.text == "hello ada via POST" and answer.headers["x-path"] == "/some/path"
    locked = client.functions.add_trigger(web["id"], "http", auth="token")
    url2 = fncloud.url + locked["url_path"] if "url_path" in locked else locked["url"]
    assert httpx.get(url2).status_code == 401
    assert httpx.get(url2, headers={"Authorization": f"Bearer {locked['token']}"}).status_code == 201


def test_async_invocations_retry_then_land_in_the_dead_letter_queue(client: Client) -> None:
    dlq = client.queues.create(f"dlq-{uuid.uuid4().hex[:6]}")
    bad = client.functions.create(f"bad-{uuid.uuid4().hex[:6]}", PYTHON, "app.always_fails",
                                  dead_letter_queue=dlq["id"])
    client.functions.upload_code(bad["id"], zipped({"app.py": APP}))
    accepted = client.functions.invoke(bad["id"], {"order": 42}, asynchronous=True)
    assert accepted["status"] == "accepted"
    messages = wait_for("the event in the dead-letter queue",
                        lambda: client.queues.receive(dlq["id"], max_messages=1), timeout=90)
    assert json.loads(messages[0]["body"]) == {"order": 42}
    wait_for("the three attempts recorded", lambda: len(invocations(client, bad["id"], "api")) >= 3)
    assert len(invocations(client, bad["id"], "api")) == 3, "the first attempt and two retries"


def test_a_schedule_fires_once_per_period(client: Client, fn: dict[str, Any]) -> None:
    trig = client.functions.add_trigger(fn["id"], "schedule", schedule="rate(1 hour)")
    with session_scope() as s:  # the next period: now (rather than waiting an hour)
        s.execute(update(FunctionTrigger).where(FunctionTrigger.id == trig["id"]).values(next_fire_at=utcnow()))
    wait_for("the scheduled invocation", lambda: invocations(client, fn["id"], "schedule"))
    time.sleep(2)
    assert len(invocations(client, fn["id"], "schedule")) == 1, "one period, one invocation"


def test_a_schedule_does_not_fire_a_period_twice_across_a_server_kill(fncloud: Cloud, client: Client,
                                                                      fn: dict[str, Any]) -> None:
    """The period is claimed (its next fire time moved on) before it runs: a server SIGKILLed right after
    the claim, then started again, does not claim it again; the invocation it accepted runs (at least once)."""
    trig = client.functions.add_trigger(fn["id"], "schedule", schedule="rate(1 hour)")
    before = len(invocations(client, fn["id"], "schedule"))
    with session_scope() as s:
        s.execute(update(FunctionTrigger).where(FunctionTrigger.id == trig["id"]).values(next_fire_at=utcnow()))
    claimed = wait_for("the period claimed", lambda: (n := _next_fire(trig["id"])) > utcnow() and n)
    fncloud.kill()
    fncloud.start()
    wait_for("the scheduled invocation", lambda: len(invocations(client, fn["id"], "schedule")) > before,
             timeout=120)
    time.sleep(3)  # several schedule passes of the new server
    assert _next_fire(trig["id"]) == claimed, "the new server did not claim the period again"


def _next_fire(trigger_id: str) -> Any:
    with session_scope(write=False) as s:
        trig = s.get(FunctionTrigger, trigger_id)
        assert trig is not None
        return trig.next_fire_at


def test_an_upload_to_a_bucket_runs_the_function(fncloud: Cloud, client: Client, fn: dict[str, Any]) -> None:
    bucket = f"uploads-{uuid.uuid4().hex[:8]}"
    cred = client.s3_credentials.create()
    s3 = boto3.client("s3", endpoint_url=fncloud.s3_url, aws_access_key_id=cred["access_key"],
                      aws_secret_access_key=cred["secret_key"], region_name="us-east-1",
                      config=Config(signature_version="s3v4", s3={"addressing_style": "path"}))
    s3.create_bucket(Bucket=bucket)
    client.functions.add_trigger(fn["id"], "object_storage", bucket=bucket, events=["created"], prefix="in/",
                                 suffix=".jpg")
    s3.put_object(Bucket=bucket, Key="in/cat.jpg", Body=b"meow")
    s3.put_object(Bucket=bucket, Key="out/cat.jpg", Body=b"ignored: prefix")
    s3.put_object(Bucket=bucket, Key="in/cat.txt", Body=b"ignored: suffix")
    [record] = wait_for("the object-storage invocation", lambda: invocations(client, fn["id"], "object_storage"))
    assert record["outcome"] == "ok"
    assert '"in/cat.jpg"' in record["logs"] and "ObjectCreated" in record["logs"]
    time.sleep(2)
    assert len(invocations(client, fn["id"], "object_storage")) == 1


def test_a_queue_trigger_consumes_messages(client: Client, fn: dict[str, Any]) -> None:
    q = client.queues.create(f"jobs-{uuid.uuid4().hex[:6]}", visibility_timeout_s=5)
    client.functions.add_trigger(fn["id"], "queue", queue=q["id"], batch_size=5)
    for i in range(3):
        client.queues.send(q["id"], json.dumps({"job": i}))
    def drained() -> bool:
        depth = client.queues.get(q["id"])
        return depth["messages_visible"] == 0 and depth["messages_in_flight"] == 0

    wait_for("the queue drained", lambda: drained() and invocations(client, fn["id"], "queue"))
    logs = "".join(r["logs"] for r in invocations(client, fn["id"], "queue"))
    assert all(f'\\"job\\": {i}' in logs for i in range(3)), logs


def test_another_projects_function_cannot_be_invoked(fncloud: Cloud, fn: dict[str, Any]) -> None:
    admin = fncloud.admin_client_unscoped()
    other = fncloud.client(project=admin.projects.create(f"other-{uuid.uuid4().hex[:6]}")["id"])
    with pytest.raises(ApiError) as err:
        other.functions.invoke(fn["id"], {})
    assert err.value.status == 404


@pytest.mark.skipif(NODE is None, reason="no Node.js on this machine")
def test_a_nodejs_function(client: Client) -> None:
    f = client.functions.create(f"node-{uuid.uuid4().hex[:6]}", str(NODE), "index.handler")
    client.functions.upload_code(f["id"], zipped({"index.js": "exports.handler = async (e) => ({sum: e.a + e.b});"}))
    assert client.functions.invoke(f["id"], {"a": 2, "b": 3})["result"] == {"sum": 5}


