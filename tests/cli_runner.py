"""`ampo <args>` through the real entry point in the test's process, for tests of the command line."""

import sys


def cli(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """Run `ampo <args>`: exit status, stdout, stderr."""
    from flows.cli import main

    monkeypatch.setattr(sys, "argv", ["ampo", *map(str, args)])
    try:
        main()
        status = 0
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    out = capsys.readouterr()
    return status, out.out, out.err
