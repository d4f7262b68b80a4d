"""Keel's benchmarks: `python -m bench NAME` (see bench/__main__.py)."""

import warnings

# tooz imports futurist, which imports eventlet, which warns of its own deprecation at
# import: once per contender process, over a hundred times in one `bench locks` run.
warnings.filterwarnings("ignore", message=r"\s*Eventlet is deprecated")
