"""The ``altclip-fast`` command line."""

import sys


def main(argv=None) -> int:
    print("altclip-fast: no subcommands yet; `altclip-fast bench` arrives with the fast model", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
