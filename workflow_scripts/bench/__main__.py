"""``python -m workflow_scripts.bench``: see :mod:`workflow_scripts.bench.run`."""

from .run import main

if __name__ == "__main__":
    main()
