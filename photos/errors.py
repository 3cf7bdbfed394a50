"""Errors of the photo tool and the exit codes ``faces.py`` maps them to (from exit_codes.py).

Every failure the user can fix is a :class:`PhotoError` with a one-line message and an exit code;
``faces.py`` (through ``cli_checks.cli_main``) prints ``faces.py: error: <message>`` on stderr and
exits with that code. Per-file
problems met while working through many inputs are :class:`Failure` records instead: they are
reported and the other inputs go on (see :func:`exit_code_for_failures`).
"""
import dataclasses

import exit_codes

EXIT_OK = exit_codes.OK
#: Bad command line (absl's UsageError exit status).
EXIT_USAGE = exit_codes.USAGE
#: --export_dir missing, not a SavedModel, or without the serving_default signature.
EXIT_BAD_EXPORT = exit_codes.BAD_EXPORT
#: No face found in a photo (or in every photo given).
EXIT_NO_FACE = exit_codes.NO_FACE
#: A file that does not exist or cannot be decoded as an image (or every file given).
EXIT_UNREADABLE = exit_codes.UNREADABLE
#: No --threshold and the export stores none.
EXIT_NO_THRESHOLD = exit_codes.NO_THRESHOLD
#: The --gallery folder holds no person folder with an image, or no gallery face was found.
EXIT_EMPTY_GALLERY = exit_codes.EMPTY_GALLERY

#: Failure.reason of a photo that decoded but where no face was found.
NO_FACE = "no_face"
#: Failure.reason of a file that does not exist.
MISSING = "missing"
#: Failure.reason of a face whose embedding came back NaN/inf from the model.
NON_FINITE = "non_finite_embedding"


class PhotoError(exit_codes.CliError):
    """A fatal, user-facing error of the photo tool: ``str(exc)`` is the message,
    ``exc.exit_code`` the status (a CliError, so ``cli_checks.cli_main`` reports it)."""

    def __init__(self, message, exit_code):
        super().__init__(message, exit_code)


@dataclasses.dataclass(frozen=True)
class Failure:
    """One input that gave no face.

    ``reason`` is ``no_face``, ``missing``, ``non_finite_embedding``, ``error`` (an I/O error or
    anything unexpected) or a :data:`data.image_io.REASONS` value (``empty``, ``not_an_image``,
    ``truncated``, ``too_large``, ``unsupported``); ``detail`` says more.
    """

    file: str
    reason: str
    detail: str = ""

    @property
    def exit_code(self):
        return EXIT_NO_FACE if self.reason == NO_FACE else EXIT_UNREADABLE

    def message(self):
        if self.reason == NO_FACE:
            text = f"{self.file}: no face found"
            if self.detail:
                text += f" ({self.detail})"
            return text
        if self.reason == MISSING:
            return f"{self.file}: no such file"
        if self.reason == NON_FINITE:
            return f"{self.file}: the model returned a non-finite embedding"
        text = f"{self.file}: unreadable ({self.reason})"
        if self.detail:
            text += f": {self.detail}"
        return text

    def to_json(self):
        return {"file": self.file, "reason": self.reason, "detail": self.detail}

    def error(self):
        """This failure as a fatal :class:`PhotoError` (for commands that need every input)."""
        return PhotoError(self.message(), self.exit_code)


def exit_code_for_failures(failures):
    """The status when *every* input failed: unreadable (4) if any input was unreadable, else no
    face (3)."""
    codes = {f.exit_code for f in failures}
    return EXIT_UNREADABLE if EXIT_UNREADABLE in codes else EXIT_NO_FACE
