"""Entry-point plumbing shared by the pipelines: one-line errors and exit codes.

Bad input is the user's to fix, not a bug: it is reported as a single `error: ...` line on
stderr with exit status 1, without a traceback. A run stopped by SIGTERM/SIGINT after saving
exits 143 so that a Kubernetes job restarts it rather than marking it finished.
"""

from __future__ import annotations

import sys

from absl import app

from tfllm.checkpoint import CheckpointError
from tfllm.config import ConfigError
from tfllm.data.corpus import CorpusError
from tfllm.data.pipeline import DataError

USER_ERRORS = (ConfigError, CorpusError, DataError, CheckpointError)


def run(main) -> None:
    """`absl.app.run(main)` with tfllm's error and exit-code conventions."""
    from tfllm.train import EXIT_SIGNALLED, StopRequested, TrainingError

    def guarded(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
        try:
            return main(argv)
        except USER_ERRORS + (TrainingError,) as e:
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(1)
        except StopRequested as e:
            print(f"tfllm: {e}", file=sys.stderr, flush=True)
            sys.exit(EXIT_SIGNALLED)

    app.run(guarded)
