"""The engine contract on BwrapEngine (real bubblewrap sandboxes, real cgroups)."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import pytest

from hackboot.functions.engine import FunctionEngine
from tests.integration.functions.engine_contract import *  # noqa: F403
from tests.integration.functions.engine_contract import PY_HELLO, PYTHON, CodeDir, spec_for

pytestmark = [
    pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap (bwrap) is not installed"),
    pytest.mark.skipif(os.geteuid() != 0, reason="cgroup limits need root"),
]


@pytest.fixture
def engine() -> Iterator[FunctionEngine]:
    from hackboot.functions.bwrap_engine import BwrapEngine

    eng = BwrapEngine()
    try:
        yield eng
    finally:
        eng.close()


def _cgroup_members() -> dict[str, list[int]]:
    from hackboot.functions import sandbox as sb

    _, parents = sb.SandboxCgroup.parents()
    members: dict[str, list[int]] = {}
    for key, parent in parents.items():
        for child in parent.iterdir():
            if child.is_dir():
                members[f"{key}/{child.name}"] = [int(p) for p in (child / "cgroup.procs").read_text().split()]
    return members


@pytest.mark.skipif(PYTHON is None, reason="no python3 runtime on this host")
def test_engine_never_shares_a_cgroup_with_function_code(engine: FunctionEngine, code_dir: CodeDir) -> None:
    # The spawner thread forks from inside a sandbox's cgroup and moves on to a spare one before the
    # function's runtime starts (the memory cgroup's OOM killer would otherwise see the engine among the
    # sandbox's tasks): once sandboxes serve, the engine is in no cgroup but the empty spare.
    code = code_dir({"app.py": PY_HELLO})
    for _ in range(4):
        spec = spec_for(code, PYTHON, "app.handler")
        assert engine.invoke(spec, b'{"name": "x"}', request_id="r").outcome == "ok"
        members = _cgroup_members()
        sandboxes = [name for name, pids in members.items() if pids and os.getpid() not in pids]
        assert sandboxes  # the warm sandboxes are there
        for name, pids in members.items():
            if os.getpid() in pids:
                assert pids == [os.getpid()], name  # only the spare cgroup, where nothing else runs


def test_wrapper_joins_the_cgroup_then_drops_privileges() -> None:
    # The path cgroup v2 hosts take (a shell joins the cgroup, setpriv drops to the account), run here
    # on whatever hierarchy the host has.
    import subprocess

    from hackboot.core import privsep
    from hackboot.functions import sandbox as sb

    account = privsep.unprivileged_account()
    cgroup = sb.SandboxCgroup.create("sbx-wrapper-test", sb.Limits(64 * 1024 * 1024, 16, 0.5))
    try:
        argv = sb.wrapped_argv(["/bin/sh", "-c", "id -u; cat /proc/self/cgroup"], procs_files=cgroup.procs_files,
                               uid=account.uid, gid=account.gid)
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True, env={}).stdout
    finally:
        cgroup.kill_all()
        cgroup.remove()
    assert out.splitlines()[0] == str(account.uid)
    assert "hackboot-functions/sbx-wrapper-test" in out


def test_code_dir_the_sandbox_account_cannot_reach_is_a_clear_engine_error(engine: FunctionEngine,
                                                                         code_dir: CodeDir) -> None:
    from hackboot.functions.engine import EngineError

    code = code_dir({"app.py": PY_HELLO})
    os.chmod(code.parent, 0o700)
    with pytest.raises(EngineError, match="cannot be searched by the sandbox account"):
        engine.invoke(spec_for(code, PYTHON, "app.handler"), b"{}", request_id="r")
    os.chmod(code.parent, 0o755)
    assert engine.invoke(spec_for(code, PYTHON, "app.handler"), b'{"name": "x"}', request_id="r").outcome == "ok"


@pytest.mark.skipif(PYTHON is None, reason="no python3 runtime on this host")
def test_slow_and_failing_inits(code_dir: CodeDir) -> None:
    from hackboot.functions.bwrap_engine import BwrapEngine

    engine = BwrapEngine(init_timeout_s=1.0)
    try:
        slow = spec_for(code_dir({"app.py": "import time\nprint('importing', flush=True)\ntime.sleep(60)\n"
                                            "def handler(e, c):\n    return 1\n"}), PYTHON, "app.handler", timeout_s=1)
        result = engine.invoke(slow, b"{}", request_id="r")
        assert result.outcome == "timeout" and result.error == "Runtime.InitTimeout: Init timed out after 1.00 seconds"
        assert "importing" in result.logs and result.cold
        dying = spec_for(code_dir({"app.py": "import os\nprint('bye', flush=True)\nos._exit(4)\n"}), PYTHON,
                         "app.handler")
        result = engine.invoke(dying, b"{}", request_id="r")
        assert result.outcome == "crashed" and "bye" in result.logs
        missing = spec_for(code_dir({"app.py": "X = 1\n"}), PYTHON, "app.handler")
        result = engine.invoke(missing, b"{}", request_id="r")
        assert result.outcome == "error" and "handler 'handler' missing" in (result.error or "")
        assert engine.warm(slow.version_id) == engine.warm(dying.version_id) == engine.warm(missing.version_id) == 0
    finally:
        engine.close()
