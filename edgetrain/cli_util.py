"""What both CLIs share: one-line errors and a non-zero exit for bad options and known failures."""

from __future__ import annotations

import logging
import os
import ssl
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import typer

from edgetrain.errors import ConfigError, EdgetrainError

try:  # recent typer vendors click as typer._click, with exception classes of its own
    from typer._click.exceptions import UsageError
except ImportError:  # pragma: no cover - older typer raises click's
    from click.exceptions import UsageError  # type: ignore[assignment]



EXIT_USAGE = 2
EXIT_FAILURE = 1


def run_app(app: typer.Typer, prog: str, argv: list[str] | None = None) -> int:
    """Run a typer app; usage errors and EdgetrainErrors become one line on stderr and an exit code."""
    try:
        result = app(args=argv, prog_name=prog, standalone_mode=False)
    except UsageError as err:
        print(f"{prog}: error: {err.format_message()}", file=sys.stderr)
        return EXIT_USAGE
    except typer.Abort:
        print(f"{prog}: aborted", file=sys.stderr)
        return 130
    except EdgetrainError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return EXIT_FAILURE
    except typer.Exit as ex:
        return int(ex.exit_code)
    return int(result) if isinstance(result, int) else 0


def count_or_auto(value: str) -> str:
    """Option callback for options that take a whole number or `auto` (else a usage error, exit 2)."""
    if value.strip().lower() != "auto" and not value.strip().isdigit():
        raise typer.BadParameter(f"{value!r} is neither a whole number nor auto")
    return value


def entry(app_factory: Callable[[], typer.Typer], prog: str) -> Callable[[], None]:
    def main() -> None:
        from edgetrain.procs import command_process

        command_process()  # a console script's own process: it may fork its agents and workers (procs.may_fork)
        sys.exit(run_app(app_factory(), prog))

    return main


def read_token(env_name: str | None, file: Path | None) -> str | None:
    """The operator token from an environment variable or a file (never from argv, which `ps` shows)."""
    if file is not None:
        try:
            token = file.read_text().strip()
        except OSError as exc:
            raise EdgetrainError(f"cannot read token file {file}: {exc.strerror}") from exc
        if not token:
            raise EdgetrainError(f"token file {file} is empty")
        return token
    if env_name:
        token = os.environ.get(env_name, "").strip()
        return token or None
    return None


def read_file(path: Path, what: str) -> bytes:
    """A file an option names (certificate, key), or a ConfigError that says which and why."""
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


LOG_LEVELS = ("debug", "info", "warning", "error", "critical")  # logging's "warn" and "fatal" are taken too


def setup_logging(level: str) -> None:
    if level.upper() not in logging.getLevelNamesMapping() or level.upper() == "NOTSET":
        raise ConfigError(f"--log-level takes {', '.join(LOG_LEVELS[:-1])} or {LOG_LEVELS[-1]}, not {level!r}")
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)


def output_folder(path: Path, option: str) -> Path:
    """The folder an option names for results, made now: a wrong one is refused before any work, not after it."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError as exc:
        raise ConfigError(f"{option} {path}: not a folder (a file of that name is there)") from exc
    except OSError as exc:
        raise ConfigError(f"{option} {path}: cannot make the folder ({exc.strerror})") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"{option} {path}: the folder is not writable")
    return path


@contextmanager
def new_folder_kept_only_if_used(path: Path | None) -> Iterator[None]:
    """If the block fails, remove `path` when it did not exist before and is still empty (nothing of it is kept)."""
    made = path is not None and not path.exists()
    try:
        yield
    except BaseException:
        if made and path is not None and path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        raise


@contextmanager
def made_output_folder(path: Path, option: str) -> Iterator[Path]:
    """`output_folder` for a block of work: if the block fails, a folder it made is removed again while empty."""
    with new_folder_kept_only_if_used(path):
        yield output_folder(path, option)


def check_tls_pair(cert: Path, key: Path, cert_option: str, key_option: str) -> None:
    """A PEM certificate and the private key that goes with it, or a ConfigError naming the options.

    gRPC reads them only when it binds or connects, and then logs its own lines and fails with no reason given.
    """
    class Encrypted(Exception):
        pass

    def no_passphrase() -> str:  # OpenSSL asks only for an encrypted key; on a terminal it would prompt
        raise Encrypted

    try:
        _tls_context(server=True).load_cert_chain(cert, key, password=no_passphrase)
    except Encrypted as exc:
        raise ConfigError(f"{key_option} {key}: the key is encrypted; gRPC needs it unencrypted (PEM)") from exc
    except OSError as exc:  # ssl.SSLError is one too
        if isinstance(exc, ssl.SSLError):
            why = ("the key does not belong to the certificate" if exc.reason == "KEY_VALUES_MISMATCH"
                   else "not a PEM certificate and its private key")
        else:
            why = exc.strerror or str(exc)
        raise ConfigError(f"{cert_option} {cert}, {key_option} {key}: {why}") from exc


def _tls_context(server: bool) -> ssl.SSLContext:
    """A context to parse PEM files with, at OpenSSL's security level 0.

    A small key or an old digest, which gRPC takes (it has its own policy), is then not called malformed here.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server else ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    return ctx


def check_tls_ca(ca: Path, option: str) -> None:
    """A PEM file of CA certificates, or a ConfigError naming the option."""
    try:
        _tls_context(server=False).load_verify_locations(cafile=ca)
    except OSError as exc:
        why = exc.strerror if not isinstance(exc, ssl.SSLError) else "no PEM certificate in it"
        raise ConfigError(f"{option} {ca}: not a CA certificate file ({why})") from exc
