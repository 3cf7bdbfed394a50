"""Exit codes of the command-line tools (train.py, evaluate.py, export.py, faces.py, data.align),
defined once: one table, one meaning per code in every tool. TF-free: a CLI can import it before
TensorFlow.

Every failure a user can fix ends with one line on stderr, ``<program>: error: <message>``, and one
of these codes; a traceback means a bug. See the README's "Failure behaviour" section.

    0  OK
    1  USAGE          bad command line or user error: unknown flag value, missing or unreadable
                      folder, read-only --model_dir, an empty dataset
    2  BAD_EXPORT     --export_dir missing, not a SavedModel, no serving signature, empty folder
    3  NO_FACE        faces.py: no face found
    4  UNREADABLE     a file that does not exist or cannot be decoded (or every file given)
    5  NO_THRESHOLD   no --threshold and the export stores none
    6  EMPTY_GALLERY  faces.py: the gallery holds no usable face
    7  LOCKED         --model_dir is in use by another running process
    8  NO_CHECKPOINT  no checkpoint in --model_dir restores (all damaged)
    9  DAMAGED_DATA   a damaged input (e.g. a truncated TFRecord shard) without the flag to skip it
   10  NAN_LOSS       train.py: the loss became NaN/inf (3 until this release, which clashed with
                      NO_FACE)
   11  CLUSTER        train.py, multi-worker: the workers of TF_CONFIG did not all come up within
                      the start-up timeout, or one stopped during training (restart the whole
                      job: it resumes from the last checkpoint)
"""
import os
import sys

OK = 0
USAGE = 1
BAD_EXPORT = 2
NO_FACE = 3
UNREADABLE = 4
NO_THRESHOLD = 5
EMPTY_GALLERY = 6
LOCKED = 7
NO_CHECKPOINT = 8
DAMAGED_DATA = 9
NAN_LOSS = 10
CLUSTER = 11


class CliError(Exception):
    """A fatal, user-facing error: ``str(exc)`` is the one-line message, ``exit_code`` the status."""

    def __init__(self, message, exit_code=USAGE):
        super().__init__(message)
        self.exit_code = int(exit_code)


def fail(message, exit_code=USAGE, program=None):
    """Print ``<program>: error: <message>`` on stderr and exit with ``exit_code``."""
    program = program or os.path.basename(sys.argv[0] or "facenet")
    sys.stderr.write(f"{program}: error: {message}\n")
    sys.stderr.flush()
    raise SystemExit(int(exit_code))
