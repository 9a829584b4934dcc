"""Command-line pieces shared by the commands that take a config: `CONFIG` and `--set KEY=VALUE ...` in either order.

argparse's nargs='+' for --set also takes a config file that follows it (`--set k=v CONFIG`) and cannot hand it back
to the positional, so SetAction keeps such a value aside and config_of puts it back as the config.
"""

from __future__ import annotations

import argparse

from harness.core.errors import ConfigError


class SetAction(argparse.Action):
    """`--set KEY=VALUE ...`; a value without `=` is the config file given after the overrides."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, [*getattr(namespace, self.dest), *(v for v in values if "=" in v)])
        for v in values:
            if "=" in v:
                continue
            if getattr(namespace, "config_after_set", None):
                raise argparse.ArgumentError(self, f"{v!r} is not KEY=VALUE (and the config file is "
                                                   f"{namespace.config_after_set}); write overrides as KEY=VALUE")
            namespace.config_after_set = v


def add_config_args(p: argparse.ArgumentParser, set_help: str) -> None:
    p.add_argument("config", nargs="?", metavar="CONFIG", help="YAML config file (see yaml/); before or after --set")
    p.add_argument("--set", dest="overrides", action=SetAction, nargs="+", default=[], metavar="KEY=VALUE",
                   help=set_help)


def given_config(args) -> str | None:
    """The config file, given before --set (the positional) or after it (SetAction); None if neither."""
    after = getattr(args, "config_after_set", None)
    if args.config and after:
        raise ConfigError(f"two config files, {args.config} and {after}; give one (overrides are KEY=VALUE)")
    return args.config or after


def config_of(args) -> str:
    """The config file, which the command requires."""
    config = given_config(args)
    if not config:
        raise ConfigError(f"no config file given; usage: harness {args.command} CONFIG [--set KEY=VALUE ...] "
                          "(see yaml/ for examples)")
    return config
