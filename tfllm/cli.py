"""Entry-point plumbing shared by the pipelines: one-line errors and exit codes.

Bad input is the user's to fix, not a bug: it is reported as a single `error: ...` line on
stderr with exit status 1, without a traceback. A run stopped by SIGTERM/SIGINT after saving
exits 143 so that a Kubernetes job restarts it rather than marking it finished.

The error classes are looked up among the modules a pipeline has already imported, so that a
pipeline without TensorFlow (pipelines.submit) does not pay for importing it here.
"""

from __future__ import annotations

import sys

from absl import app

EXIT_SIGNALLED = 143  # 128 + SIGTERM: a preempted job is not a finished one, so it gets restarted
USER_ERRORS = {"tfllm.config": "ConfigError", "tfllm.data.corpus": "CorpusError", "tfllm.data.pipeline": "DataError",
               "tfllm.checkpoint": "CheckpointError", "tfllm.loop": "TrainingError",
               "tfllm.distributed": "ElasticError",
               "tfllm.labelled": "LabelledDataError", "tfllm.interfaces": "InterfaceError"}


def _loaded(classes: dict[str, str]) -> tuple[type, ...]:
    return tuple(getattr(sys.modules[m], c) for m, c in classes.items() if m in sys.modules)


def run(main) -> None:
    """`absl.app.run(main)` with tfllm's error and exit-code conventions."""

    def guarded(argv):
        if len(argv) > 1:
            raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (flags take the form --name=value)")
        try:
            return main(argv)
        except Exception as e:
            if isinstance(e, _loaded(USER_ERRORS)):
                print(f"error: {e}", file=sys.stderr, flush=True)
                sys.exit(1)
            if isinstance(e, _loaded({"tfllm.loop": "StopRequested"})):
                if e.checkpoint:  # rank 0 alone saves, so it alone reports
                    print(f"tfllm: {e}", file=sys.stderr, flush=True)
                sys.exit(EXIT_SIGNALLED)
            raise

    app.run(guarded)
