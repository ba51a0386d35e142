"""bubblewrap's command line for a function sandbox: the isolation flags are always there."""

from __future__ import annotations

from pathlib import Path

from hackboot.functions.sandbox import SandboxLayout, bwrap_argv, unprivileged_argv, wrapped_argv


def layout(**kw: object) -> SandboxLayout:
    base: dict[str, object] = {"executable": Path("/usr/bin/python3.11"), "code_fd": 7, "bootstrap_fd": 8,
                               "seccomp_fd": 9, "tmp_bytes": 1 << 20, "network": False, "env": {"A": "1"}}
    base.update(kw)
    return SandboxLayout(**base)  # type: ignore[arg-type]


def pairs(argv: list[str], flag: str) -> list[str]:
    return [argv[i + 1] for i, a in enumerate(argv) if a == flag]


def test_isolation_flags() -> None:
    argv = bwrap_argv(layout(), ["/usr/bin/python3.11", "-c", "pass"])
    for flag in ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
                 "--unshare-net", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in argv
    assert pairs(argv, "--cap-drop") == ["ALL"]
    assert pairs(argv, "--uid") == ["65534"] and pairs(argv, "--gid") == ["65534"]
    assert pairs(argv, "--seccomp") == ["9"]
    assert pairs(argv, "--ro-bind-fd") == ["7", "8"]
    assert pairs(argv, "--size") == [str(1 << 20)]
    assert argv.index("--size") + 2 == argv.index("--tmpfs")  # the size applies to /tmp
    assert pairs(argv, "--remount-ro") == ["/"]
    assert argv[argv.index("--clearenv") + 1:argv.index("--clearenv") + 4] == ["--setenv", "A", "1"]
    assert argv[-4:] == ["--", "/usr/bin/python3.11", "-c", "pass"]
    binds = pairs(argv, "--ro-bind")
    assert "/usr" in binds and not any(b in binds for b in ("/etc", "/root", "/home", "/var", "/proc", "/"))
    assert "/etc/resolv.conf" not in binds


def test_network_opt_in() -> None:
    argv = bwrap_argv(layout(network=True), ["true"])
    assert "--unshare-net" not in argv
    assert "--unshare-user" in argv


def test_block_fd() -> None:
    assert pairs(bwrap_argv(layout(block_fd=11), ["true"]), "--block-fd") == ["11"]
    assert "--block-fd" not in bwrap_argv(layout(), ["true"])


def test_privilege_drop_and_cgroup_wrapper() -> None:
    assert unprivileged_argv(["bwrap"], uid=None, gid=None) == ["bwrap"]
    dropped = unprivileged_argv(["bwrap"], uid=999, gid=995)
    assert dropped[1:] == ["--reuid=999", "--regid=995", "--clear-groups", "--nnp", "--", "bwrap"]
    wrapped = wrapped_argv(["bwrap", "x"], procs_files=[Path("/cg/a/cgroup.procs")], uid=999, gid=995)
    assert wrapped[:2] == ["/bin/sh", "-c"]
    assert wrapped[3:6] == ["sh", "1", "/cg/a/cgroup.procs"]
    assert wrapped[-2:] == ["bwrap", "x"]
