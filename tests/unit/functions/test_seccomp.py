"""The seccomp program, run on a small classic-BPF interpreter: what it answers for each syscall."""

from __future__ import annotations

import errno
import struct

import pytest

from hackboot.functions.sandbox import AUDIT_ARCH_X86_64, DENIED_SYSCALLS, seccomp_program

ALLOW = 0x7FFF0000
KILL = 0x80000000
ERRNO = 0x00050000


def run_filter(program: bytes, nr: int, arch: int = AUDIT_ARCH_X86_64, args: tuple[int, ...] = ()) -> int:
    """Evaluate the filter on a seccomp_data (only the opcodes the engine's filter may use)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *(list(args) + [0] * (6 - len(args))))
    insns = [struct.unpack("<HBBI", program[i:i + 8]) for i in range(0, len(program), 8)]
    acc = 0
    pc = 0
    while True:
        code, jt, jf, k = insns[pc]
        if code == 0x20:  # ld w abs
            acc = struct.unpack_from("<I", data, k)[0]
            pc += 1
        elif code in (0x15, 0x35, 0x45):  # jeq, jge, jset (constant)
            taken = acc == k if code == 0x15 else acc >= k if code == 0x35 else bool(acc & k)
            pc += 1 + (jt if taken else jf)
        elif code == 0x06:  # ret k
            return k
        else:
            raise AssertionError(f"unexpected opcode {code:#x}")


PROGRAM = seccomp_program()


def test_program_is_well_formed() -> None:
    assert len(PROGRAM) % 8 == 0 and len(PROGRAM) // 8 < 4096  # BPF_MAXINSNS


@pytest.mark.parametrize("nr", [0, 1, 2, 3, 9, 39, 57, 59, 60, 231, 257, 262])  # read ... openat, newfstatat
def test_ordinary_syscalls_allowed(nr: int) -> None:
    assert run_filter(PROGRAM, nr) == ALLOW


@pytest.mark.parametrize("name", sorted(DENIED_SYSCALLS))
def test_denied_syscalls_get_eperm(name: str) -> None:
    assert run_filter(PROGRAM, DENIED_SYSCALLS[name]) == ERRNO | errno.EPERM


def test_the_required_syscalls_are_in_the_deny_list() -> None:
    for required in ("ptrace", "mount", "umount2", "pivot_root", "kexec_load", "init_module", "finit_module",
                     "delete_module", "bpf", "perf_event_open", "keyctl", "add_key", "request_key", "userfaultfd",
                     "unshare", "setns", "reboot", "swapon", "swapoff", "open_by_handle_at"):
        assert required in DENIED_SYSCALLS


def test_clone_with_namespace_flags_refused_plain_clone_allowed() -> None:
    sigchld = 17
    assert run_filter(PROGRAM, 56, args=(sigchld,)) == ALLOW  # fork
    assert run_filter(PROGRAM, 56, args=(0x003D0F00,)) == ALLOW  # pthread_create's flags
    for flag in (0x20000, 0x02000000, 0x04000000, 0x08000000, 0x10000000, 0x20000000, 0x40000000, 0x80):
        assert run_filter(PROGRAM, 56, args=(flag | sigchld,)) == ERRNO | errno.EPERM
    assert run_filter(PROGRAM, 435) == ERRNO | errno.ENOSYS  # clone3: the C library falls back to clone


def test_other_architectures_and_x32_killed() -> None:
    assert run_filter(PROGRAM, 0, arch=0x40000003) == KILL  # i386: another syscall table
    assert run_filter(PROGRAM, 101, arch=0xC00000B7) == KILL  # aarch64
    assert run_filter(PROGRAM, 0x40000000 + 101) == KILL  # the x32 ABI's ptrace
