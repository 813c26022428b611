"""What every `python -m minift` command line shares: --help with defaults, one-line errors."""
from __future__ import annotations

import argparse


class ShowDefaults(argparse.ArgumentDefaultsHelpFormatter):
    """--help with every option's default, except where there is none to show (required options,
    None) or the help text already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.required or action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """Bad input ends the run with one line on stderr ("minift bench: error: ...") and exit
    code 2; the usage is one --help away instead of repeated above every error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(str(message).split())} (see {self.prog} --help)\n")
