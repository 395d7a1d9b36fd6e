"""``fedrelay export RUN_ID --format csv|jsonl``: a run's stored events as a file.

JSON Lines keeps every event exactly as stored. CSV is for spreadsheets and pandas: one row per
event, nested fields flattened into dotted columns (``data.eval_metrics.loss``), lists as JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import os
import sys
import urllib.error
import urllib.parse
from collections.abc import Iterator, Sequence
from typing import IO, Any

from .api_client import ApiClient
from .client_settings import DEFAULT_URL, relay_urls, subscribe_token
from .failover import parse_urls
from .follow import RelayRefused, http_base
from .tls import certificate_problem, explain_certificate, resolve_ca_file

PAGE = 5000
FIXED_COLUMNS = ("seq", "type", "run_id", "timestamp", "producer", "id", "source.role", "source.client_id")


def fetch_events(
    url: str | Sequence[str] | ApiClient,
    run_id: str,
    token: str | None = None,
    since: int = 0,
    ca_file: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Every stored event of the run after ``since``, paging ``/api/runs/{run_id}/events``.

    ``url``: one address of the relay or several (a page one cannot serve is asked of the next,
    from the same seq), or a ready :class:`ApiClient`. An ``https``/``wss`` relay's certificate
    is verified (``ca_file``, else the system CAs).
    """
    client = url if isinstance(url, ApiClient) else ApiClient(api_bases(url), token, ca_file)
    quoted = urllib.parse.quote(run_id, safe="")
    while True:
        page = client.get(f"/api/runs/{quoted}/events?since={since}&limit={PAGE}")
        if not page["events"]:
            return
        yield from page["events"]
        since = page["next_since"]


def api_bases(url: str | Sequence[str]) -> list[str]:
    """``http(s)://host:port`` of each address."""
    return [http_base(u) for u in parse_urls(url)]


def flatten(value: Any, prefix: str, out: dict[str, Any]) -> dict[str, Any]:
    """Nested dicts become dotted keys; an empty dict or a list stays one JSON cell."""
    if isinstance(value, dict) and value:
        for key, item in value.items():
            flatten(item, f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value
    return out


def cell(value: Any) -> str:
    """CSV text: numbers in their shortest exact form, strings as they are, None empty."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def write_jsonl(events: Iterator[dict[str, Any]], out: IO[str]) -> int:
    count = 0
    for event in events:
        out.write(json.dumps(event, separators=(",", ":"), ensure_ascii=False) + "\n")
        count += 1
    return count


def write_csv(events: Iterator[dict[str, Any]], out: IO[str]) -> int:
    rows = [flatten(event, "", {}) for event in events]
    columns = list(FIXED_COLUMNS)
    known = set(columns)
    for row in rows:
        for key in row:
            if key not in known:
                known.add(key)
                columns.append(key)
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns)
    for row in rows:
        writer.writerow([cell(row.get(column)) for column in columns])
    return len(rows)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add ``export`` to a ``fedrelay`` sub-command set."""
    export = subparsers.add_parser(
        "export", help="write a run's events as CSV or JSON Lines", description=__doc__.split("\n\n")[0]
    )
    export.add_argument("run_id", help="the run to export")
    export.add_argument("--format", choices=["csv", "jsonl"], default="jsonl")
    export.add_argument("--out", metavar="FILE", help="output file (default: stdout)")
    export.add_argument("--since", type=int, default=0, help="only events after this seq")
    export.add_argument(
        "--url",
        action="append",
        help=f"relay address (FEDRELAY_URL, else {DEFAULT_URL}); several nodes of one relay: "
        "comma-separated or repeated, a page one cannot serve is asked of the next",
    )
    export.add_argument("--token", help="subscribe token (FEDRELAY_SUBSCRIBE_TOKEN)")
    export.add_argument(
        "--ca-file", help="CA bundle for an https:// relay (FEDRELAY_CA_FILE; default: system CAs)"
    )
    export.set_defaults(func=run)
    return export


def run(args: argparse.Namespace) -> int:
    """Write the file; exit 1 when the relay or the run cannot be read (no partial file is left)."""
    urls = relay_urls(args.url)
    token = subscribe_token(args.token)
    write = write_csv if args.format == "csv" else write_jsonl
    ca_file = resolve_ca_file(args.ca_file)
    try:
        client = ApiClient(api_bases(urls), token, ca_file)
    except RelayRefused as exc:  # the CA file
        print(f"fedrelay export: {exc}", file=sys.stderr)
        return 1
    events = fetch_events(client, args.run_id, since=args.since)
    partial = args.out + ".partial" if args.out else None
    try:
        if partial:
            with open(partial, "w", encoding="utf-8", newline="") as out:
                count = write(events, out)
            os.replace(partial, args.out)  # no half-written file under the real name
            print(f"wrote {count} events of run {args.run_id} to {args.out}", file=sys.stderr)
        else:
            write(events, sys.stdout)
    except (urllib.error.URLError, OSError) as exc:
        if partial:
            with contextlib.suppress(OSError):
                os.remove(partial)
        problem = certificate_problem(exc)
        url = client.last_tried
        if isinstance(exc, urllib.error.HTTPError):
            detail = exc.read().decode(errors="replace")
            print(f"fedrelay export: {url} answered {exc.code}: {detail}", file=sys.stderr)
        elif problem is not None:
            print(f"fedrelay export: {explain_certificate(url, problem, ca_file)}", file=sys.stderr)
        else:
            where = url if len(urls) == 1 else ", ".join(urls)
            reason = getattr(exc, "reason", exc)
            print(f"fedrelay export: cannot read from {where}: {reason}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fedrelay.export``: the command on its own."""
    parser = argparse.ArgumentParser(prog="fedrelay")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["export", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
