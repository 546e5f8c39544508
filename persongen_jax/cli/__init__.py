"""What the command-line tools share: the help formatter (argparse only; importing this loads no JAX)."""

from __future__ import annotations

import argparse


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the line breaks of the description (its examples) and ends each option's help with its default
    when it has one the help does not already state."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text.lower()
            or not action.option_strings
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, description: str | None, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser with `HelpFormatter`."""
    return argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)
