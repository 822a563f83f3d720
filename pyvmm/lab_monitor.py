"""Ask the QEMU monitor of a running `pyvmm lab --monitor SOCKET` questions, from outside the lab.

    python -m pyvmm.lab_monitor SOCKET ['info registers -a' ...]

With no question it asks STALL_QUESTIONS: what a lab that stopped answering says about itself.
"""

from __future__ import annotations

import socket
import sys

# Where each lab CPU is, whether it halted, and which interrupts its local APIC holds pending (IRR) or in
# service (ISR); then the lab's kernel is asked, by SysRq keys, for its blocked tasks, every CPU's
# backtrace and every task's state, which it prints on its console (`pyvmm lab -v`) if its CPUs still
# take the keyboard's interrupt.
STALL_QUESTIONS = ("info status", "info cpus", "info registers -a", "info lapic 0", "info lapic 1", "info pic",
                   "sendkey alt-sysrq-w", "sendkey alt-sysrq-l", "sendkey alt-sysrq-t")
PROMPT = b"(qemu) "


def ask(sock_path: str, questions: tuple[str, ...] | list[str] = STALL_QUESTIONS, timeout: float = 5) -> str:
    """The monitor's answers to `questions`, each after its own `(qemu) question` line, or why there are
    none; every read is bounded by `timeout` s, so a stuck QEMU cannot hang the caller."""
    out: list[str] = []
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(sock_path)

            def until_prompt() -> str:
                buf = b""
                while not buf.endswith(PROMPT):
                    chunk = s.recv(65536)
                    if not chunk:
                        break
                    buf += chunk
                return buf.removesuffix(PROMPT).decode(errors="replace")

            until_prompt()  # the banner
            for q in questions:
                s.sendall(q.encode() + b"\n")
                answer = until_prompt().split("\n", 1)  # the monitor echoes the question first
                out.append(f"(qemu) {q}\n{answer[1] if len(answer) > 1 else ''}")
    except OSError as e:
        out.append(f"monitor {sock_path}: {e}\n")
    return "".join(out).replace("\r", "")


def main(argv: list[str] | None = None) -> int:
    """Entry point: print the answers; exit 2 without a socket path, 1 if the monitor did not answer."""
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help"):
        print(__doc__.strip(), file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    text = ask(args[0], args[1:] or STALL_QUESTIONS)
    sys.stdout.write(text)
    return 1 if text.startswith(f"monitor {args[0]}:") else 0


if __name__ == "__main__":
    sys.exit(main())
