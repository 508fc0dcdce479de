"""`rexrag-retrieve serve`: serve an index over the Search-R1 `/retrieve` HTTP API.

Loads the index written by `rexrag-index build` and blocks in the server until Ctrl-C. Expected failures
(a missing index, a port already taken) print one `error: ...` line and exit 2.
"""

from __future__ import annotations

import argparse
import logging
import math
import os

from rexrag_jax.cli.command import int_in, positive_int, run_command

port_number = int_in(0, 65535)  # 0 lets the OS pick a free port


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rexrag-retrieve", description="Retrieval services over an index.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="serve an index over the Search-R1 /retrieve HTTP API",
        description='Serve POST /retrieve ({"queries", "topk", "return_scores"}, '
        "as Search-R1's retrieval server) and GET /health.",
    )
    serve.add_argument("--index", required=True, metavar="DIR", help="index directory from `rexrag-index build`")
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="interface to listen on (default: 127.0.0.1; 0.0.0.0 exposes it to the network)",
    )
    serve.add_argument("--port", type=port_number, default=8000, help="TCP port (default: 8000)")
    serve.add_argument(
        "--max-queries", type=positive_int, default=512, metavar="N", help="most queries per request (default: 512)"
    )
    serve.add_argument(
        "--max-topk",
        type=positive_int,
        default=100,
        metavar="N",
        help="largest topk a request may ask for (default: 100)",
    )
    serve.add_argument(
        "--default-topk",
        type=positive_int,
        default=3,
        metavar="N",
        help="topk when a request omits it (default: 3, as Search-R1)",
    )
    # Unset, these two are left to the server's `Limits` defaults (60 s, 64), so the defaults live in one place.
    serve.add_argument(
        "--request-timeout",
        type=positive_seconds,
        metavar="S",
        help="seconds a client has to send a whole request, however slowly; then 408 (default: 60)",
    )
    serve.add_argument(
        "--max-connections",
        type=positive_int,
        metavar="N",
        help="connections served at once; one more gets 503 + Retry-After (default: 64)",
    )
    serve.add_argument("--encoder", metavar="DIR", help="encoder directory, overriding the one the index names")
    serve.add_argument("--backend", choices=("scann", "exact"), help="override the index's search backend")
    serve.add_argument("-v", "--verbose", action="store_true", help="log one line per request")
    return parser


def _serve(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.getLogger("rexrag_jax.retrieval.server").setLevel(logging.DEBUG)
    if not os.path.isdir(args.index):
        raise FileNotFoundError(f"index directory not found: {args.index}")
    if args.default_topk > args.max_topk:
        raise ValueError(f"--default-topk ({args.default_topk}) exceeds --max-topk ({args.max_topk})")
    from rexrag_jax.retrieval.index import load_index  # lazy: jax is slow to import
    from rexrag_jax.retrieval.server import serve

    encoder = None
    if args.encoder is not None:
        from rexrag_jax.retrieval.encoder import load_encoder

        encoder = load_encoder(args.encoder)
    index = load_index(args.index, encoder=encoder, backend=args.backend)
    limits = {"max_queries": args.max_queries, "max_topk": args.max_topk, "default_topk": args.default_topk}
    if args.request_timeout is not None:
        limits["request_timeout_s"] = args.request_timeout
    if args.max_connections is not None:
        limits["max_connections"] = args.max_connections
    try:
        serve(index, args.host, args.port, **limits)
    except OSError as e:  # bind failed: the port is taken or the host is not ours
        raise OSError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    finally:
        close = getattr(index, "close", None)
        if callable(close):
            close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run `rexrag-retrieve`; returns the exit status (0 after Ctrl-C, 2 bad input)."""
    return run_command(build_parser(), _serve, argv, on_interrupt=lambda: 0)  # Ctrl-C: nothing to clean up


def cli() -> None:
    """console_scripts entry point."""
    raise SystemExit(main())


if __name__ == "__main__":
    cli()
