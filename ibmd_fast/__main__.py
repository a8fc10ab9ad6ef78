"""``python -m ibmd_fast``: the ``ibmd-fast`` command line."""

from ibmd_fast.cli import main

if __name__ == "__main__":
    main()
