"""Up-front checks of the folders and files a command line names, and the CLI error boundary.

TF-free, so that a CLI can refuse a bad command line before it imports TensorFlow. Every check
raises :class:`exit_codes.CliError` with a one-line message that names the flag and the path;
:func:`cli_main` turns it into ``<program>: error: <message>`` on stderr and the error's exit code
(see exit_codes.py). Anything else still raises with its traceback: that is a bug.
"""
import os
import tempfile

from exit_codes import USAGE, CliError, fail


def _reason(exc):
    return exc.strerror or type(exc).__name__


def require_dir(path, flag, exit_code=USAGE):
    """``path`` must be an existing folder (an input such as --data_dir)."""
    if not path:
        raise CliError(f"{flag} is empty", exit_code)
    if not os.path.exists(path):
        raise CliError(f"{flag} {path}: no such folder", exit_code)
    if not os.path.isdir(path):
        raise CliError(f"{flag} {path}: not a folder", exit_code)
    if not os.access(path, os.R_OK | os.X_OK):
        raise CliError(f"{flag} {path}: folder not readable", exit_code)


def require_file(path, flag, exit_code=USAGE):
    """``path`` must be an existing, readable file (an input such as --lfw_pairs)."""
    if not path:
        raise CliError(f"{flag} is empty", exit_code)
    if not os.path.isfile(path):
        raise CliError(f"{flag} {path}: no such file", exit_code)
    if not os.access(path, os.R_OK):
        raise CliError(f"{flag} {path}: file not readable", exit_code)


def _first_file_on_path(path):
    """The nearest existing ancestor of ``path`` (itself included) when it is not a folder."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            return None
        path = parent
    return None if os.path.isdir(path) else path


def _writable_dir_problem(path):
    """Create the folder ``path`` if needed; None when a file can be written in it, else why not."""
    blocker = _first_file_on_path(path)
    if blocker:
        return f"{blocker} is a file, not a folder"
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as exc:
        return f"cannot create the folder ({_reason(exc)})"
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        return f"folder not writable ({_reason(exc)})"
    return None


def require_writable_dir(path, flag, exit_code=USAGE):
    """Create the folder ``path`` (an output such as --model_dir) if needed and check that a file
    can be written in it: a hidden probe file is written and removed, which also catches read-only
    mounts (and works for root, whom file modes do not stop)."""
    if not path:
        raise CliError(f"{flag} is empty", exit_code)
    problem = _writable_dir_problem(path)
    if problem:
        raise CliError(f"{flag} {path}: {problem}", exit_code)


def require_writable_parent(path, flag, exit_code=USAGE):
    """The folder that will hold the file or folder ``path`` (an output such as --export_dir or
    --output_json) exists or can be created, and can be written."""
    if not path:
        raise CliError(f"{flag} is empty", exit_code)
    parent = os.path.dirname(os.path.abspath(path))  # abspath drops a trailing slash
    problem = _writable_dir_problem(parent)
    if problem:
        raise CliError(f"{flag} {path}: {problem}" if problem.startswith("/")
                       else f"{flag} {path}: its folder {parent}: {problem}", exit_code)


def cli_main(main, program, user_errors=()):
    """Wrap an ``absl.app`` main: deprecated flag names are applied first
    (``flags.apply_deprecated_aliases``); CliError and the ``user_errors`` end as one line
    ``<program>: error: <message>`` on stderr; other exceptions propagate (a traceback is a bug).

    ``user_errors``: exception types (exit code USAGE) or ``(type, exit_code)`` pairs.
    """
    table = [(e, USAGE) if isinstance(e, type) else (e[0], int(e[1])) for e in user_errors]

    def wrapped(argv):
        try:
            import flags  # TF-free; deprecated flag names set their new flags first

            flags.apply_deprecated_aliases(program)
            return main(argv)
        except CliError as exc:
            fail(" ".join(str(exc).split()), exc.exit_code, program)
        except tuple(t for t, _ in table) as exc:  # noqa: B030 - a tuple of exception types
            code = next(c for t, c in table if isinstance(exc, t))
            fail(" ".join(str(exc).split()), code, program)

    return wrapped
