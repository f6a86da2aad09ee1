"""A process of the agent's user, without CAP_SYS_PTRACE, attaches (ptrace) to the card-session
process in the moment between its execve and its prctl(PR_SET_DUMPABLE, 0), turns that call into
prctl(PR_SET_DUMPABLE, 1) and prints what the process receives on its channel from the supervisor:
the PIN, before this fix. Now no PIN reaches a traced process: the card-session process refuses
when it finds itself traced or dumpable, and the supervisor, which reads the kernel's TracerPid of
its child where no tracer can change it, refuses to send it a PIN (docs/pin-handling.md).

The tracer is real (C, ptrace, no capability), as are the agent, SoftHSM and the kernel. The only
help is for determinism: the moment is otherwise the interpreter's start-up (a few ms), which a
tracer polling /proc hits most times but not every time; a ``sitecustomize`` on PYTHONPATH makes
the card-session process sleep 1 s before its first statement, so that the tracer always attaches
in it, as an attacker's would on a slower or busier machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from agent_runner import WITHOUT_PTRACE, running_agent, start_agent, stop_agent, tunnel, write_config
from conftest import USER_PIN, ProvisionedPki
from peers.ports import free_port

pytestmark = [
    pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc not installed"),
    pytest.mark.skipif(Path("/proc/sys/kernel/yama/ptrace_scope").exists()
                       and Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip() != "0",
                       reason="Yama ptrace_scope >= 1 closes the window: no tracer can attach"),
]

# "flip": the reviewer's tracer. "hide": it also lies to the card-session process about itself
# (prctl(PR_GET_DUMPABLE) answers 0, TracerPid in its /proc/self/status reads 0), so that only the
# supervisor's own look at the kernel's TracerPid stands between it and the PIN.
TRACER_C = r"""
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ptrace.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static int find_worker(const char *where, int *fd) {
    DIR *d = opendir("/proc"); struct dirent *e; char path[64], buf[4096];
    while ((e = readdir(d))) {
        int pid = atoi(e->d_name); if (pid <= 0) continue;
        snprintf(path, sizeof path, "/proc/%d/cmdline", pid);
        FILE *f = fopen(path, "r"); if (!f) continue;
        size_t n = fread(buf, 1, sizeof buf - 1, f); fclose(f); buf[n] = 0;
        /* python -P -m dicom_card_agent.session.worker FD REPORTS LEVEL PID DIR */
        char *args[10]; int argc = 0; size_t off = 0;
        while (off < n && argc < 10) { args[argc++] = buf + off; off += strlen(buf + off) + 1; }
        if (argc >= 9 && strcmp(args[3], "dicom_card_agent.session.worker") == 0 && strstr(args[8], where)) {
            *fd = atoi(args[4]); closedir(d); return pid;
        }
    }
    closedir(d); return 0;
}

static void peek(int pid, unsigned long long at, unsigned char *out, long len) {
    for (long i = 0; i < len; i += 8) { long w = ptrace(PTRACE_PEEKDATA, pid, at + i, 0); memcpy(out + i, &w, 8); }
}

static void poke(int pid, unsigned long long at, unsigned char *in, long len) {
    for (long i = 0; i + 8 <= len; i += 8) { long w; memcpy(&w, in + i, 8); ptrace(PTRACE_POKEDATA, pid, at + i, w); }
}

int main(int argc, char **argv) {
    const char *where = argv[1]; int hide = argc > 2 && strcmp(argv[2], "hide") == 0;
    int fd = -1, pid = 0; time_t until = time(NULL) + 60;
    while (!(pid = find_worker(where, &fd))) { if (time(NULL) > until) return 3; usleep(100); }
    if (ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACESYSGOOD) != 0) {
        printf("tracer: PTRACE_SEIZE %d failed: %s\n", pid, strerror(errno)); return 1;
    }
    ptrace(PTRACE_INTERRUPT, pid, 0, 0);
    int status; waitpid(pid, &status, 0);
    printf("tracer: attached to card-session process %d (channel fd %d)\n", pid, fd); fflush(stdout);
    int watching = 0, get_dumpable = 0, opening_status = 0, reading_status = 0, status_fd = -1;
    unsigned long long buffer = 0;
    ptrace(PTRACE_SYSCALL, pid, 0, 0);
    while (waitpid(pid, &status, __WALL) == pid) {
        if (WIFEXITED(status) || WIFSIGNALED(status)) break;
        int sig = 0;
        if (WIFSTOPPED(status) && WSTOPSIG(status) == (SIGTRAP | 0x80)) {
            struct user_regs_struct r; ptrace(PTRACE_GETREGS, pid, 0, &r);
            if ((long long)r.rax == -ENOSYS) {  /* entering a system call */
                if (r.orig_rax == 157 && r.rdi == 4 && r.rsi == 0) {
                    r.rsi = 1; ptrace(PTRACE_SETREGS, pid, 0, &r);
                    printf("tracer: prctl(PR_SET_DUMPABLE, 0) turned into prctl(PR_SET_DUMPABLE, 1)\n"); fflush(stdout);
                }
                get_dumpable = hide && r.orig_rax == 157 && r.rdi == 3;
                watching = r.orig_rax == 45 && (int)r.rdi == fd;  /* recvfrom on the channel */
                reading_status = hide && r.orig_rax == 0 && status_fd >= 0 && (int)r.rdi == status_fd;
                opening_status = 0;
                if (hide && r.orig_rax == 257) {
                    unsigned char name[40] = {0}; peek(pid, r.rsi, name, 32);
                    opening_status = strcmp((char *)name, "/proc/self/status") == 0;
                }
                if (r.orig_rax == 3 && (int)r.rdi == status_fd) status_fd = -1;
                buffer = r.rsi;
            } else {  /* leaving it */
                long long result = (long long)r.rax;
                if (get_dumpable) {
                    r.rax = 0; ptrace(PTRACE_SETREGS, pid, 0, &r);
                    printf("tracer: prctl(PR_GET_DUMPABLE) answered 0\n"); fflush(stdout);
                }
                if (opening_status && result >= 0) status_fd = (int)result;
                if (reading_status && result > 0 && result < 8192) {
                    static unsigned char text[8200]; peek(pid, buffer, text, result);
                    char *line = memmem(text, result, "TracerPid:\t", 11);
                    if (line) {
                        for (char *c = line + 11; *c >= '0' && *c <= '9'; c++) *c = c == line + 11 ? '0' : ' ';
                        poke(pid, buffer, text, result);
                        printf("tracer: TracerPid hidden in what it read of /proc/self/status\n"); fflush(stdout);
                    }
                }
                if (watching && result > 0 && result < 256) {
                    unsigned char out[264] = {0}; peek(pid, buffer, out, result);
                    for (long i = 0; i < result; i++) if (out[i] < 32 || out[i] > 126) out[i] = '.';
                    printf("tracer: card-session process %d received %lld bytes on its channel: \"%s\"\n",
                           pid, result, out);
                    fflush(stdout);
                }
            }
        } else if (WIFSTOPPED(status) && (status >> 16) == PTRACE_EVENT_STOP) {
            sig = 0;
        } else if (WIFSTOPPED(status)) {
            sig = WSTOPSIG(status);
        }
        ptrace(PTRACE_SYSCALL, pid, 0, sig);
    }
    printf("tracer: card-session process %d ended\n", pid); fflush(stdout);
    return 0;
}
"""

SLOW_START = """\
import sys
import time

if "dicom_card_agent.session.worker" in sys.orig_argv:  # the card-session process only
    time.sleep(1.0)
"""


@pytest.fixture(scope="module")
def tracer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("tracer")
    (directory / "tracer.c").write_text(TRACER_C)
    subprocess.run(["gcc", "-O2", "-o", str(directory / "tracer"), str(directory / "tracer.c")], check=True,
                   capture_output=True, timeout=120)
    return directory / "tracer"


def sign_in_with_a_tracer_in_the_window(test_pki: ProvisionedPki, tmp_path: Path, tracer: Path,
                                        mode: str) -> tuple[str, str, int]:
    """Start the agent (env: PIN, so the PIN goes without anyone typing it) while ``tracer`` waits for
    its card-session process; what the tracer printed, the agent's log once the sign-in ended, and
    the tracer's pid (setpriv execs it)."""
    slow_start = tmp_path / "slow-start"
    slow_start.mkdir()
    (slow_start / "sitecustomize.py").write_text(SLOW_START)
    printed = tmp_path / "tracer.out"
    with open(printed, "w") as out:
        attacker = subprocess.Popen([*WITHOUT_PTRACE, str(tracer), str(tmp_path), mode], stdout=out,
                                    stderr=subprocess.STDOUT)
    try:
        with running_agent(test_pki, tmp_path / "agent", [tunnel("pacs", free_port())],
                           env={"PYTHONPATH": os.pathsep.join([str(slow_start), os.environ.get("PYTHONPATH", "")])},
                           prefix=WITHOUT_PTRACE) as agent:
            agent.wait_for_log("event=sign-in", 30)  # sign-in= or sign-in-failed
            time.sleep(0.5)  # the tracer prints what it read as it reads it
            log = agent.log()
    finally:
        if attacker.poll() is None:
            attacker.kill()
        attacker.wait(10)
    return printed.read_text(), log, attacker.pid


def test_a_tracer_that_undoes_the_prctl_gets_no_pin(test_pki: ProvisionedPki, tmp_path: Path, tracer: Path) -> None:
    seen, log, tracer_pid = sign_in_with_a_tracer_in_the_window(test_pki, tmp_path, tracer, "flip")
    assert "tracer: attached to card-session process" in seen, seen  # the moment was hit: the test means something
    assert "turned into prctl(PR_SET_DUMPABLE, 1)" in seen
    assert USER_PIN not in seen, seen  # before: 'received 6 bytes on its channel: "123456"'
    assert "event=sign-in subject=" not in log
    failed = [line for line in log.splitlines() if "event=sign-in-failed" in line]
    assert len(failed) == 1, log
    assert (f"stopped before reading the card: it is being traced by pid {tracer_pid} (tracer); no PIN is asked "
            "for or sent") in failed[0], log + seen  # the whole log: "see the lines above" points into it


def test_a_tracer_that_hides_itself_from_its_tracee_gets_no_pin(
        test_pki: ProvisionedPki, tmp_path: Path, tracer: Path) -> None:
    seen, log, tracer_pid = sign_in_with_a_tracer_in_the_window(test_pki, tmp_path, tracer, "hide")
    assert "tracer: attached to card-session process" in seen, seen
    assert USER_PIN not in seen, seen  # before: 'received 6 bytes on its channel: "123456"'
    assert "TracerPid hidden" in seen and "prctl(PR_GET_DUMPABLE) answered 0" in seen, seen  # the tracee was fooled
    assert "event=sign-in subject=" not in log
    failed = [line for line in log.splitlines() if "event=sign-in-failed" in line]
    assert len(failed) == 1, log
    assert f"is being traced by pid {tracer_pid} (tracer): the PIN is not sent" in failed[0], log + seen


@pytest.mark.skipif(shutil.which("strace") is None, reason="strace not installed")
def test_an_agent_started_under_a_tracer_does_not_start(test_pki: ProvisionedPki, tmp_path: Path) -> None:
    """The supervisor's own moment: an env: PIN is taken at start-up, and a tracer attached since its
    start (here strace, its parent) would read it and every PIN after it."""
    config = write_config(tmp_path / "agent.toml", test_pki, [tunnel("pacs", free_port())])
    process = start_agent(config, tmp_path / "agent.log", test_pki.env(CARD_PIN=USER_PIN),
                          prefix=[*WITHOUT_PTRACE, "strace", "-qq", "-o", os.devnull])
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        pass
    finally:
        status = process.poll()
        stop_agent(process)
    log = (tmp_path / "agent.log").read_text()
    assert status == 2, log  # before: the agent became ready, traced
    assert "ready:" not in log and "event=card-inserted" not in log
    assert log.splitlines()[-1] == (
        f"card-agent: error: the agent does not start: it is being traced by pid {process.pid} (strace) (a debugger "
        "or another process of the agent's user attached as it started); no PIN is read. Stop that process, or run "
        "the agent without a debugger (docs/troubleshooting.md)")
