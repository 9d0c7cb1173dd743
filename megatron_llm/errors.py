"""The one exception type that means "the user asked for something we cannot do", and the command-line
parser that reports a malformed command line the same way."""

import argparse


class UsageError(Exception):
    """Bad config, bad data or an impossible layout. Entry points print it as one line and exit 2."""

    exit_code = 2


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser, with a malformed command line (a wrong choice, a number that is not one, a missing
    flag) as one `error: ...` line and exit status 2, like a UsageError, instead of the usage block first."""

    def error(self, message: str):
        self.exit(UsageError.exit_code, f"error: {message}; see {self.prog} --help\n")
