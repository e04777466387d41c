"""The one exception type users see.

Every bad input becomes a ``CnnlabError`` whose message says what was found, what was
expected and how to fix it. The CLI prints it on one line and exits with status 2; the
Python API lets it propagate.
"""


class CnnlabError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM stopped training after a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, run, signum: int):
        import signal
        self.run, self.exit_code = run, 128 + signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}: checkpoint saved; "
                         f"continue with `cnnlab train --resume {run}`")
