"""``dispatcher-agent``: run the reference node agent."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

from pythonjsonlogger.json import JsonFormatter

from dispatcher.agent.node import AgentConfig, Fatal, NodeAgent
from dispatcher.agent.runner import load_handler


def _pairs(values: list[str], what: str, default: str | None = None) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for value in values:
        key, sep, val = value.partition("=")
        if sep:
            pairs[key] = val
        elif default is not None:
            pairs[key] = default
        else:
            raise argparse.ArgumentTypeError(f"{what} {value!r} must look like key=value")
    return pairs


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dispatcher-agent",
                                description="Connect this machine to the dispatcher as a GPU node.")
    local_url = f"ws://127.0.0.1:{os.environ.get('PORT', '8000')}/ws/node"
    p.add_argument("--url", default=os.environ.get("DISPATCHER_NODE_URL", local_url),
                   help="the dispatcher's node endpoint (env DISPATCHER_NODE_URL)")
    state_file = Path(os.environ.get("DISPATCHER_AGENT_STATE", "~/.dispatcher-agent.json")).expanduser()
    p.add_argument("--state-file", type=Path, default=state_file,
                   help="where node_id and node_secret are kept (mode 0600)")
    p.add_argument("--model", action="append", default=[], metavar="ID[=STATUS]",
                   help="an installed model, ready unless a status is given (repeatable)")
    p.add_argument("--models-file", type=Path, help='JSON {"model_id": "status"}, re-read before every heartbeat')
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE", help="a node label (repeatable)")
    p.add_argument("--max-concurrent-jobs", type=int, default=1)
    p.add_argument("--accept-public-jobs", action="store_true")
    p.add_argument("--registration-token", default=os.environ.get("DISPATCHER_REGISTRATION_TOKEN"),
                   help="needed when the server has tokens configured (env DISPATCHER_REGISTRATION_TOKEN)")
    p.add_argument("--handler", default="dispatcher.agent.handlers:demo", metavar="MODULE:FUNCTION",
                   help="the function that runs a job")
    p.add_argument("--drain-timeout", type=float, default=30.0, help="seconds to finish jobs on SIGTERM")
    p.add_argument("--log-level", default=os.environ.get("DISPATCHER_LOG_LEVEL", "INFO"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    handler_out = logging.StreamHandler(sys.stdout)
    handler_out.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"asctime": "ts", "levelname": "level", "name": "logger"}))
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler_out])
    logging.getLogger("websockets").setLevel(logging.WARNING)
    try:
        config = AgentConfig(
            url=args.url, state_path=args.state_file, models=_pairs(args.model, "--model", default="ready"),
            models_file=args.models_file, labels=_pairs(args.label, "--label"),
            max_concurrent_jobs=args.max_concurrent_jobs, accept_public_jobs=args.accept_public_jobs,
            registration_token=args.registration_token)
        handler = load_handler(args.handler)
    except (argparse.ArgumentTypeError, ValueError, ImportError) as exc:
        print(f"dispatcher-agent: {exc}", file=sys.stderr)
        return 2
    agent = NodeAgent(config, handler)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(agent.stop(args.drain_timeout)))
        await agent.run()

    try:
        asyncio.run(run())
    except Fatal as exc:
        print(f"dispatcher-agent: {exc}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
