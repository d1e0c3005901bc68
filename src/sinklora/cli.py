"""The one entry point: ``sinklora COMMAND [--config FILE] [key=value | --key value ...]``.

Parsing and dispatch only. Every command lives in :mod:`sinklora.commands`, a module that exposes
``CONFIG`` (a typed config dataclass, see :mod:`sinklora.config`) and ``main(cfg) -> int | None``;
options are the config's fields, declared once there. ``sinklora COMMAND --help`` lists them with
their defaults without importing torch.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

from sinklora.config import ConfigError, describe, load_config

# command words -> module. Modules are imported lazily so `sinklora --help` stays instant.
COMMANDS: dict[str, str] = {
    "train": "sinklora.commands.train",
    "sft": "sinklora.commands.sft",
    "compare": "sinklora.commands.compare",
    "export": "sinklora.commands.export",
    "eval ppl": "sinklora.commands.eval_ppl",
    "eval passkey": "sinklora.commands.eval_passkey",
    "eval ruler": "sinklora.commands.eval_ruler",
    "eval longbench": "sinklora.commands.eval_longbench",
    "chat": "sinklora.commands.chat",
    "serve": "sinklora.commands.serve",
    "data mix": "sinklora.commands.data_mix",
    "data tasks": "sinklora.commands.data_tasks",
    "model prepare": "sinklora.commands.model_prepare",
}


def _summaries(group: str | None = None) -> list[tuple[str, str]]:
    """(command words, first docstring line) of every command, or of one group's (``eval``, ``data``)."""
    rows = []
    for words, module in COMMANDS.items():
        if group is not None and not words.startswith(group + " "):
            continue
        try:
            doc = (importlib.import_module(module).__doc__ or "").strip()
        except ImportError:
            continue  # a command whose module is not part of this build
        rows.append((words, doc.splitlines()[0] if doc else ""))
    return rows


def _usage(group: str | None = None) -> str:
    if group is not None:
        lines = [f"usage: sinklora {group} SUBCOMMAND [--config FILE] [key=value ...]", "", "subcommands:"]
        lines += [f"  {words.split(' ', 1)[1]:<10} {summary}" for words, summary in _summaries(group)]
        return "\n".join(lines + ["", f"`sinklora {group} SUBCOMMAND --help` lists its options."])
    lines = ["usage: sinklora COMMAND [--config FILE] [key=value ...]", "", "commands:"]
    lines += [f"  {words:<14} {summary}" for words, summary in _summaries()]
    return "\n".join(lines + ["", "`sinklora COMMAND --help` lists the command's options."])


GROUPS = sorted({words.split()[0] for words in COMMANDS if " " in words})


def _split_command(argv: list[str]) -> tuple[str | None, list[str]]:
    for n in (2, 1):
        words = " ".join(argv[:n])
        if len(argv) >= n and words in COMMANDS:
            return words, argv[n:]
    return None, argv


def _parse_options(args: list[str]) -> tuple[str | None, list[str], bool]:
    """-> (config path, ["key=value", ...], wants_help). Accepts key=value, --key=value, --key value."""
    config, overrides, wants_help = None, [], False
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-h", "--help"):
            wants_help = True
        elif a == "--config" or a.startswith("--config="):
            if "=" in a:
                config = a.split("=", 1)[1]
            else:
                if i + 1 >= len(args):
                    raise ConfigError(["--config needs a file path"])
                config, i = args[i + 1], i + 1
        elif a.startswith("--"):
            key = a[2:]
            if "=" in key:
                overrides.append(key)
            elif i + 1 < len(args) and not args[i + 1].startswith("--") and "=" not in args[i + 1]:
                overrides.append(f"{key}={args[i + 1]}")
                i += 1
            else:  # a bare flag means true
                overrides.append(f"{key}=true")
        elif "=" in a:
            overrides.append(a)
        else:
            raise ConfigError([f"unexpected argument {a!r}: options are key=value or --key value"])
        i += 1
    return config, overrides, wants_help


def main(argv: list[str] | None = None) -> int:
    try:
        code = _main(list(sys.argv[1:] if argv is None else argv))
        sys.stdout.flush()  # inside the try: a closed pipe must raise here, not at interpreter exit
        return code
    except BrokenPipeError:
        # the reader left (`sinklora train --help | head -3`): stop quietly, and point stdout at devnull so
        # the interpreter's final flush has nothing left to fail on
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # what a process killed by SIGPIPE reports


def _main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command, rest = _split_command(argv)
    if command is None:
        group = argv[0] if argv and argv[0] in GROUPS else None  # `sinklora eval --help`: its subcommands
        asked = argv[1:] if group else argv
        wants_help = not argv or asked[:1] in (["-h"], ["--help"])
        print(_usage(group), file=sys.stdout if wants_help else sys.stderr)
        return 0 if wants_help else 2
    module = importlib.import_module(COMMANDS[command])
    try:
        config_path, overrides, wants_help = _parse_options(rest)
        if wants_help:
            print(f"usage: sinklora {command} [--config FILE] [key=value ...]\n")
            print((module.__doc__ or "").strip() + "\n\noptions (key, default, meaning):")
            for key, default, text in describe(module.CONFIG):
                print(f"  {key:<32} {default:<20} {text}")
            return 0
        cfg = load_config(module.CONFIG, config_path, overrides)
    except ConfigError as e:
        print(f"sinklora {command}: {e}", file=sys.stderr)
        return 2
    try:
        return int(module.main(cfg) or 0)
    except (ValueError, FileNotFoundError) as e:
        # user-facing errors from the library already name the field, the value and the fix
        print(f"sinklora {command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nsinklora {command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
