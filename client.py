"""Run CSV workloads against the model server and print the overall cache hit rate as the last line.

    python3 client.py PORT COEFS a.csv [b.csv ...]      e.g. python3 client.py 5440 1,2,3 x1.csv x2.csv

SetCoefs first, then one thread per CSV calls Predict for each of its rows over one shared channel.
Exit codes: 0 every row predicted, 1 some rows failed or the server could not be reached, 2 bad usage.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import re
import socket
import ssl
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from models import affinity_key
from stubs import ADMIN_TOKEN_ENV, NO_MODEL_ERROR, join_address, pb2, pb2_grpc

EXIT_FAILED, EXIT_USAGE = 1, 2
TLS_PROBE_TIMEOUT = 3.0  # seconds for the one handshake that tells TLS mismatches apart
SERVER_GONE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


class UsageError(Exception):
    """A mistake in the command line or an input file, found before any call."""


def say(message: str) -> None:
    """One line on stderr that does not tear the progress bar."""
    tqdm.write(message, file=sys.stderr)


@dataclass
class Row:
    line: int
    values: list[float]


@dataclass
class MalformedRow:
    line: int
    bad_cell: str


@dataclass
class Header:
    line: int


def csv_lines(path: str) -> Iterator[tuple[int, list[str]]]:
    """Non-blank lines as (line number, cells), read one at a time as spreadsheets write CSV: UTF-8,
    with or without a byte-order mark. Raises UsageError naming the line for text that is not CSV."""
    try:
        with Path(path).open(newline="", encoding="utf-8-sig") as file:
            reader = csv.reader(file)
            for cells in reader:
                if any(cell.strip() for cell in cells):
                    yield reader.line_num, cells
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {path}: it is not UTF-8 text") from None
    except csv.Error as error:
        raise UsageError(f"{path}:{reader.line_num}: {error}") from None


def data_rows(path: str) -> Iterator[Row | MalformedRow | Header]:
    """The file's lines, streamed: a first line none of whose cells is a number is a header; any other
    line with a cell that is not a number is a malformed row."""
    for position, (line, cells) in enumerate(csv_lines(path)):
        bad_cell = next((cell for cell in cells if not _is_number(cell)), None)
        if bad_cell is None:
            yield Row(line, [float(cell) for cell in cells])
        elif position == 0 and not any(map(_is_number, cells)):
            yield Header(line)
        else:
            yield MalformedRow(line, bad_cell)


def check_has_rows(path: str) -> None:
    """Refuse, before any call, a file that cannot be read or holds no row (empty, or a header alone)."""
    if next((row for row in data_rows(path) if not isinstance(row, Header)), None) is None:
        raise UsageError(f"{path} has no rows to predict (it is empty or holds only a header)")


def count_lines(path: str) -> int:
    """The file's lines, an upper bound on its rows, counted in bounded memory for the progress report."""
    with Path(path).open("rb") as file:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: file.read(1 << 20), b""))


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def parse_coefs(text: str) -> list[float] | None:
    """The coefficients to set, or None for "-": keep the model the server has (a served model file)."""
    if text == "-":
        return None
    try:
        return [float(cell) for cell in next(csv.reader([text]))]
    except (ValueError, StopIteration):
        raise UsageError(f"COEFS must be comma-separated numbers like 1.0,2.0,3.0, got {text!r}") from None


@dataclass
class Tally:
    """What one thread saw of its file; only that thread writes it."""

    path: str
    rows: int = 0
    hits: int = 0
    misses: int = 0
    failed: int = 0

    @property
    def done(self) -> int:
        return self.hits + self.misses + self.failed


@dataclass
class Run:
    """What the worker threads share: the stub, the settings, and the first sign the server is gone."""

    stub: pb2_grpc.ModelServerStub
    coefs: list[float] | None
    args: argparse.Namespace
    progress: tqdm
    server_gone: threading.Event = field(default_factory=threading.Event)
    lost_because: str = ""
    _model_lock: threading.Lock = field(default_factory=threading.Lock)

    def predict(self, row: Row) -> pb2.PredictResponse:
        """Predict one row; a server that restarted without a model gets the coefficients again."""
        reply = self._call(row)
        if reply.error == NO_MODEL_ERROR and self.coefs is not None:
            with self._model_lock:
                say("the server has no model (restarted?): sending the coefficients again")
                if problem := set_coefs(self.stub, self.coefs, self.args):
                    say(f"error: {problem}")
            reply = self._call(row)
        return reply

    def _call(self, row: Row) -> pb2.PredictResponse:
        return self.stub.Predict(
            pb2.PredictRequest(X=row.values),
            timeout=self.args.timeout,
            wait_for_ready=True,
            metadata=routing_metadata(self.args, row.values),
        )


def routing_metadata(args: argparse.Namespace, X: Sequence[float] | None = None) -> tuple[tuple[str, str], ...] | None:
    """What Ray Serve's proxy routes by: the application, and with --affinity the row's cache key as the
    session, so that each key always reaches the one replica that caches it. None for a plain server."""
    metadata = []
    if args.application:
        metadata.append(("application", args.application))
    if args.affinity and X is not None:
        metadata.append(("session_id", affinity_key(X)))
    return tuple(metadata) or None


def predict_file(run: Run, tally: Tally) -> None:
    """Predict every row of one file as it is read; a file that turns out unreadable midway is one line."""
    try:
        for row in data_rows(tally.path):
            if run.server_gone.is_set():
                return
            predict_row(run, tally, row)
            run.progress.update(1)
    except UsageError as error:
        say(f"error: {error}; the rest of the file is skipped")
        tally.failed += 1


def predict_row(run: Run, tally: Tally, row: Row | MalformedRow | Header) -> None:
    where = f"{tally.path}:{row.line}"
    if isinstance(row, Header):
        say(f"{where}: header skipped")
        return
    if isinstance(row, MalformedRow):
        say(f"{where}: skipped, not a number: {row.bad_cell!r}")
        tally.failed += 1
        return
    tally.rows += 1
    try:
        reply = run.predict(row)
    except grpc.RpcError as error:
        if error.code() in SERVER_GONE:
            run.lost_because = f"{error.code().name}: {error.details()}"
            run.server_gone.set()
            return
        say(f"{where}: {error.code().name}: {error.details()}")
        tally.failed += 1
        return
    if reply.error:
        say(f"{where}: {reply.error}")
        tally.failed += 1
    elif reply.hit:
        tally.hits += 1
    else:
        tally.misses += 1


def retry_service_config(args: argparse.Namespace) -> str:
    """gRPC's own retry policy: UNAVAILABLE is retried with exponential backoff."""
    policy = {
        "maxAttempts": args.attempts,
        "initialBackoff": f"{args.backoff}s",
        "maxBackoff": f"{args.max_backoff}s",
        "backoffMultiplier": args.backoff_multiplier,
        "retryableStatusCodes": ["UNAVAILABLE"],
    }
    return json.dumps({"methodConfig": [{"name": [{"service": "ModelServer"}], "retryPolicy": policy}]})


def open_channel(args: argparse.Namespace, tls_ca: bytes | None) -> grpc.Channel:
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(args)),
        ("grpc.initial_reconnect_backoff_ms", int(args.backoff * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(args.max_backoff * 1000)),
    ]
    address = join_address(args.host, args.port)
    if tls_ca is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca)
    return grpc.secure_channel(address, credentials, options=options)


def set_coefs(stub: pb2_grpc.ModelServerStub, coefs: list[float], args: argparse.Namespace) -> str:
    """SetCoefs; returns "" or the one line that ends the run."""
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {args.token}"),) if args.token else ()
    metadata += routing_metadata(args) or ()
    try:
        reply = stub.SetCoefs(
            pb2.SetCoefsRequest(coefs=coefs), timeout=args.timeout, wait_for_ready=True, metadata=metadata
        )
    except grpc.RpcError as error:
        if error.code() in SERVER_GONE:
            return f"could not reach the server at {join_address(args.host, args.port)} within {args.timeout:g} s"
        if error.code() == grpc.StatusCode.PERMISSION_DENIED:
            return f"SetCoefs refused: {error.details()} (pass --token or set {ADMIN_TOKEN_ENV})"
        return f"SetCoefs failed: {error.code().name}: {error.details()}"
    return f"SetCoefs: {reply.error}" if reply.error else ""


def run_workloads(
    stub: pb2_grpc.ModelServerStub, coefs: list[float] | None, paths: list[str], args: argparse.Namespace
) -> tuple[list[Tally], str]:
    """One thread per file; returns each one's tally and why the server was lost, if it was."""
    lines = sum(map(count_lines, paths))
    with tqdm(total=lines, unit="row", file=sys.stderr, disable=not sys.stderr.isatty()) as progress:
        run = Run(stub, coefs, args, progress)
        tallies = [Tally(path) for path in paths]
        threads = [threading.Thread(target=predict_file, args=(run, tally), daemon=True) for tally in tallies]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():
                thread.join(args.progress_every)
                if progress.disable and thread.is_alive():
                    say(f"progress: {sum(tally.done for tally in tallies):,} of about {lines:,} rows")
    return tallies, run.lost_because


def port_number(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 1 to 65535, got {value}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], usage="%(prog)s [options] PORT COEFS CSV [CSV ...]"
    )
    # No option starts with a digit, so "-1,2,3" is coefficients, not an option (argparse's own pattern
    # only takes "-1" or "-1.5" alone for a negative number).
    parser._negative_number_matcher = re.compile(r"^-\.?\d")
    parser.add_argument("port", type=port_number, help="the server's port")
    parser.add_argument("coefs", help="comma-separated coefficients, e.g. 1.0,2.0,3.0; '-' keeps the served model")
    parser.add_argument("csv_files", nargs="+", metavar="CSV", help="one thread per file, one Predict per row")
    parser.add_argument("--host", default="localhost", help="server host (default %(default)s)")
    parser.add_argument(
        "--timeout",
        type=float,
        default=20.0,
        help="deadline of each call in seconds, retries included (default %(default)s)",
    )
    parser.add_argument(
        "--attempts", type=int, default=5, help="attempts per call on UNAVAILABLE, at most 5 (default %(default)s)"
    )
    parser.add_argument(
        "--backoff", type=float, default=1.0, help="first retry backoff in seconds (default %(default)s)"
    )
    parser.add_argument(
        "--backoff-multiplier", type=float, default=2.0, help="backoff growth per retry (default %(default)s)"
    )
    parser.add_argument(
        "--max-backoff", type=float, default=30.0, help="largest backoff in seconds (default %(default)s)"
    )
    parser.add_argument(
        "--token",
        default=os.environ.get(ADMIN_TOKEN_ENV) or None,
        help=f"admin token for SetCoefs (default ${ADMIN_TOKEN_ENV})",
    )
    parser.add_argument("--tls-ca", type=Path, help="PEM certificate of the CA that signed the server's certificate")
    parser.add_argument(
        "--application", help="the Ray Serve application to call through its gRPC proxy (needed when it runs several)"
    )
    parser.add_argument(
        "--affinity",
        action="store_true",
        help="send each row's cache key as Ray Serve's session_id, so one replica caches each row",
    )
    parser.add_argument(
        "--progress-every",
        type=float,
        default=5.0,
        help="seconds between progress lines on stderr when it is not a terminal (default %(default)s)",
    )
    args = parser.parse_args(argv)
    if not 2 <= args.attempts <= 5:
        parser.error(f"--attempts must be from 2 to 5 (gRPC's limit), got {args.attempts}")
    positive = (args.timeout, args.backoff, args.max_backoff, args.backoff_multiplier, args.progress_every)
    if not all(0 < value < math.inf for value in positive):
        parser.error("--timeout, --backoff, --backoff-multiplier, --max-backoff and --progress-every must be positive")
    return args


def read_ca(path: Path) -> bytes:
    """The CA certificate for --tls-ca, or a UsageError that says what is wrong with the file."""
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UsageError(f"cannot read the CA certificate {path}: {error.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise UsageError(f"--tls-ca {path} is not a PEM certificate (no '-----BEGIN CERTIFICATE-----' line)")
    return data


def tls_mismatch(args: argparse.Namespace) -> str | None:
    """Why TLS cannot work with the server, found with one handshake of our own, or None.

    gRPC retries a failed handshake like an absent server, until the deadline; one plain TLS handshake
    tells a wrong CA, a TLS client before a plaintext server and the reverse apart at once.
    """
    address = join_address(args.host, args.port)
    try:
        connection = socket.create_connection((args.host.strip("[]"), args.port), timeout=TLS_PROBE_TIMEOUT)
    except OSError:
        return None  # nobody listens yet: that is the retry policy's business
    if args.tls_ca is None:
        context = ssl.create_default_context()
        context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    else:
        context = ssl.create_default_context(cafile=str(args.tls_ca))
    try:
        with context.wrap_socket(connection, server_hostname=args.host.strip("[]")):
            pass
    except ssl.SSLCertVerificationError as error:
        return f"the TLS handshake with {address} failed: the server's certificate is refused ({error.verify_message})"
    except (ssl.SSLError, OSError) as error:
        if args.tls_ca is not None:
            return f"the server at {address} does not speak TLS ({error}); leave out --tls-ca"
        return None  # a plaintext server, as expected
    finally:
        connection.close()
    if args.tls_ca is None:
        return f"the server at {address} speaks TLS: pass --tls-ca with the CA that signed its certificate"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        coefs = parse_coefs(args.coefs)
        for path in args.csv_files:
            check_has_rows(path)
        tls_ca = read_ca(args.tls_ca) if args.tls_ca is not None else None
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    if problem := tls_mismatch(args):
        print(f"error: {problem}", file=sys.stderr)
        return EXIT_FAILED
    with open_channel(args, tls_ca) as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        if coefs is not None and (problem := set_coefs(stub, coefs, args)):
            print(f"error: {tls_mismatch(args) or problem}", file=sys.stderr)
            return EXIT_FAILED
        tallies, lost_because = run_workloads(stub, coefs, args.csv_files, args)
    for tally in tallies:
        say(f"{tally.path}: {tally.rows} rows, {tally.hits} hits, {tally.misses} misses, {tally.failed} failed")
    hits, misses = sum(t.hits for t in tallies), sum(t.misses for t in tallies)
    if lost_because:
        say(
            f"error: lost the server at {join_address(args.host, args.port)} ({lost_because}); "
            f"counted {hits + misses} rows"
        )
    if hits + misses:
        print(hits / (hits + misses), flush=True)
    else:
        say("no prediction ran, so there is no hit rate")
    return EXIT_FAILED if any(t.failed for t in tallies) or lost_because else 0


if __name__ == "__main__":
    sys.exit(main())
