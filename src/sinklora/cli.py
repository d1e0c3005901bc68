"""The one entry point: ``sinklora COMMAND [--config FILE] [key=value | --key value ...]``.

Parsing and dispatch only. Every command lives in :mod:`sinklora.commands`, a module that exposes
``CONFIG`` (a typed config dataclass, see :mod:`sinklora.config`) and ``main(cfg) -> int | None``;
options are the config's fields, declared once there. ``sinklora COMMAND --help`` lists them with
their defaults without importing torch.
"""

from __future__ import annotations

import importlib
import logging
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


def _usage() -> str:
    lines = ["usage: sinklora COMMAND [--config FILE] [key=value ...]", "", "commands:"]
    for words, module in COMMANDS.items():
        summary = ""
        try:
            doc = importlib.import_module(module).__doc__ or ""
            summary = doc.strip().splitlines()[0] if doc.strip() else ""
        except ImportError:
            continue  # a command whose module is not part of this build
        lines.append(f"  {words:<14} {summary}")
    lines.append("")
    lines.append("`sinklora COMMAND --help` lists the command's options.")
    return "\n".join(lines)


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
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    command, rest = _split_command(argv)
    if command is None:
        print(_usage())
        return 0 if not argv or argv[0] in ("-h", "--help") else 2
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
