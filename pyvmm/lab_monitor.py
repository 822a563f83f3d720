"""Ask the QEMU monitor of a running `pyvmm lab --monitor SOCKET` questions, from outside the lab.

    python -m pyvmm.lab_monitor SOCKET ['info registers -a' ...]

With no question it asks STALL_QUESTIONS: what a lab that stopped answering says about itself.
"""

from __future__ import annotations

import socket
import sys
from typing import NamedTuple

# Where each lab CPU is, whether it halted, and which interrupts its local APIC holds pending (IRR) or in
# service (ISR); then the lab's kernel is asked, by SysRq keys, for its blocked tasks, every CPU's
# backtrace and every task's state, which it prints on its console (`pyvmm lab -v`) if its CPUs still
# take the keyboard's interrupt.
STALL_QUESTIONS = ("info status", "info cpus", "info registers -a", "info lapic 0", "info lapic 1", "info pic",
                   "sendkey alt-sysrq-w", "sendkey alt-sysrq-l", "sendkey alt-sysrq-t")
PROMPT = b"(qemu) "


class Answers(NamedTuple):
    """What the monitor answered, each after its own `(qemu) question` line, and why it stopped early."""

    text: str
    error: str | None  # None when every question was answered

    def report(self) -> str:
        """The answers, then the error on a line of its own if there was one."""
        return self.text + (f"{self.error}\n" if self.error else "")


def ask(sock_path: str, questions: tuple[str, ...] | list[str] = STALL_QUESTIONS, timeout: float = 5) -> Answers:
    """The monitor's answers to `questions`; every read is bounded by `timeout` s, so a stuck QEMU cannot
    hang the caller."""
    out: list[str] = []
    error = None
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)

            def until_prompt() -> str:
                buf = b""
                while not buf.endswith(PROMPT):
                    chunk = s.recv(65536)
                    if not chunk:
                        raise ConnectionError("the monitor closed the connection")
                    buf += chunk
                return buf.removesuffix(PROMPT).decode(errors="replace")

            until_prompt()  # the banner
            for q in questions:
                s.sendall(q.encode() + b"\n")
                answer = until_prompt().split("\n", 1)  # the monitor echoes the question first
                out.append(f"(qemu) {q}\n{answer[1] if len(answer) > 1 else ''}")
    except OSError as e:
        error = f"monitor {sock_path}: {e}"
    return Answers("".join(out).replace("\r", ""), error)


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the answers; exit 2 without a socket path, 1 if the monitor did not answer them all."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    answers = ask(args[0], args[1:] or STALL_QUESTIONS)
    sys.stdout.write(answers.text)
    if answers.error:
        print(answers.error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
