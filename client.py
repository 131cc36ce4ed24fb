"""Run CSV workloads against the model server and print the overall cache hit rate as the last line.

    python3 client.py PORT COEFS a.csv [b.csv ...]      e.g. python3 client.py 5440 1,2,3 x1.csv x2.csv

SetCoefs first, then one thread per CSV calls Predict for each of its rows over one shared channel.
Exit codes: 0 every row predicted, 1 some rows failed or the server could not be reached, 2 bad usage.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from tqdm import tqdm

from stubs import ADMIN_TOKEN_ENV, NO_MODEL_ERROR, join_address, pb2, pb2_grpc

EXIT_FAILED, EXIT_USAGE = 1, 2
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
class Workload:
    path: str
    rows: list[Row]
    malformed: int


def read_csv_text(path: str) -> str:
    try:
        with Path(path).open(newline="") as file:
            return file.read()
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise UsageError(f"cannot read {path}: it is not a text CSV file") from None


def parse_workload(path: str, text: str) -> Workload:
    """Rows of numbers; a non-numeric first line is a header, other bad rows are reported and skipped."""
    rows, malformed, seen_content = [], 0, False
    for number, cells in enumerate(csv.reader(text.splitlines()), start=1):
        if not any(cell.strip() for cell in cells):
            continue
        try:
            rows.append(Row(number, [float(cell) for cell in cells]))
        except ValueError:
            bad = next(cell for cell in cells if not _is_number(cell))
            if seen_content:
                say(f"{path}:{number}: skipped, not a number: {bad!r}")
                malformed += 1
            else:
                say(f"{path}:{number}: header skipped")
        seen_content = True
    return Workload(path, rows, malformed)


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
    """What one thread saw; only that thread writes it."""

    hits: int = 0
    misses: int = 0
    failed: int = 0


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
        return self.stub.Predict(pb2.PredictRequest(X=row.values), timeout=self.args.timeout, wait_for_ready=True)


def predict_file(run: Run, workload: Workload, tally: Tally) -> None:
    for row in workload.rows:
        if run.server_gone.is_set():
            return
        try:
            reply = run.predict(row)
        except grpc.RpcError as error:
            if error.code() in SERVER_GONE:
                run.lost_because = f"{error.code().name}: {error.details()}"
                run.server_gone.set()
                return
            say(f"{workload.path}:{row.line}: {error.code().name}: {error.details()}")
            tally.failed += 1
        else:
            tally_reply(workload, row, reply, tally)
        run.progress.update(1)


def tally_reply(workload: Workload, row: Row, reply: pb2.PredictResponse, tally: Tally) -> None:
    if reply.error:
        say(f"{workload.path}:{row.line}: {reply.error}")
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


def open_channel(args: argparse.Namespace) -> grpc.Channel:
    options = [
        ("grpc.enable_retries", 1),
        ("grpc.service_config", retry_service_config(args)),
        ("grpc.initial_reconnect_backoff_ms", int(args.backoff * 1000)),
        ("grpc.max_reconnect_backoff_ms", int(args.max_backoff * 1000)),
    ]
    address = join_address(args.host, args.port)
    if args.tls_ca is None:
        return grpc.insecure_channel(address, options=options)
    credentials = grpc.ssl_channel_credentials(root_certificates=args.tls_ca.read_bytes())
    return grpc.secure_channel(address, credentials, options=options)


def set_coefs(stub: pb2_grpc.ModelServerStub, coefs: list[float], args: argparse.Namespace) -> str:
    """SetCoefs; returns "" or the one line that ends the run."""
    metadata = (("authorization", f"Bearer {args.token}"),) if args.token else None
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
    stub: pb2_grpc.ModelServerStub, coefs: list[float] | None, workloads: list[Workload], args: argparse.Namespace
) -> tuple[list[Tally], str]:
    """One thread per workload; returns each one's tally and why the server was lost, if it was."""
    total_rows = sum(len(workload.rows) for workload in workloads)
    with tqdm(total=total_rows, unit="row", file=sys.stderr, disable=not sys.stderr.isatty()) as progress:
        run = Run(stub, coefs, args, progress)
        tallies = [Tally() for _ in workloads]
        threads = [
            threading.Thread(target=predict_file, args=(run, workload, tally), daemon=True)
            for workload, tally in zip(workloads, tallies, strict=True)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return tallies, run.lost_because


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], usage="%(prog)s [options] PORT COEFS CSV [CSV ...]"
    )
    parser.add_argument("port", type=int, help="the server's port")
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
    args = parser.parse_args(argv)
    if not 2 <= args.attempts <= 5:
        parser.error(f"--attempts must be from 2 to 5 (gRPC's limit), got {args.attempts}")
    if args.timeout <= 0 or args.backoff <= 0 or args.max_backoff <= 0 or args.backoff_multiplier <= 0:
        parser.error("--timeout, --backoff, --backoff-multiplier and --max-backoff must be positive")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        coefs = parse_coefs(args.coefs)
        texts = [read_csv_text(path) for path in args.csv_files]
        if args.tls_ca is not None and not args.tls_ca.is_file():
            raise UsageError(f"cannot read the CA certificate {args.tls_ca}")
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USAGE
    workloads = [parse_workload(path, text) for path, text in zip(args.csv_files, texts, strict=True)]
    with open_channel(args) as channel:
        stub = pb2_grpc.ModelServerStub(channel)
        if coefs is not None and (problem := set_coefs(stub, coefs, args)):
            print(f"error: {problem}", file=sys.stderr)
            return EXIT_FAILED
        tallies, lost_because = run_workloads(stub, coefs, workloads, args)
    for workload, tally in zip(workloads, tallies, strict=True):
        say(
            f"{workload.path}: {len(workload.rows)} rows, {tally.hits} hits, {tally.misses} misses, "
            f"{tally.failed + workload.malformed} failed"
        )
    hits, misses = sum(t.hits for t in tallies), sum(t.misses for t in tallies)
    failed = sum(t.failed for t in tallies) + sum(w.malformed for w in workloads)
    if lost_because:
        say(
            f"error: lost the server at {join_address(args.host, args.port)} ({lost_because}); "
            f"counted {hits + misses} of {sum(len(w.rows) for w in workloads)} rows"
        )
    if hits + misses:
        print(hits / (hits + misses), flush=True)
    else:
        say("no prediction ran, so there is no hit rate")
    return EXIT_FAILED if failed or lost_because else 0


if __name__ == "__main__":
    sys.exit(main())
