"""`misguard serve`: the guard as an OpenAI-compatible server in front of a deployed VLM (the `guard` extra).

API keys never come from argv (any user sees argv in `ps`): the client key from MISGUARD_SERVE_API_KEY or
--client-api-key-file, the upstream's from MISGUARD_UPSTREAM_API_KEY or --upstream-api-key-file (a file wins over
its variable). Binding an address other than loopback without a client key is refused, unless
--insecure-no-auth says that is meant.
"""
from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from misguard.cli.infer import Engine
from misguard.cli.options import Given, config_options
from misguard.cli.score import CascadeBandOption, LiteJudgeOption, ServedModel
from misguard.core.errors import MisguardError
from misguard.core.settings import read_key
from misguard.engines.base import EngineOptions
from misguard.guard.server.app import create_app, run_server
from misguard.guard.server.loading import build_service

commands = typer.Typer()
CLIENT_KEY_ENV = "MISGUARD_SERVE_API_KEY"
UPSTREAM_KEY_ENV = "MISGUARD_UPSTREAM_API_KEY"


@commands.command("serve")
# The guard's image limits are the policy's (limits.max_image_*): the engine never opens a file for it.
@config_options(EngineOptions, exclude=("max_image_bytes", "max_image_pixels"))
def serve(
    judge: Annotated[Path, typer.Option(
        help="Judge folder: a VLM judge (model + judge.json), a plain instruct VLM folder, or a lite judge "
             "(`misguard train --kind lite`; it guards the output rail only).")],
    upstream: Annotated[str, typer.Option(help="The guarded VLM's OpenAI-compatible URL ending in /v1.")],
    host: Annotated[str, typer.Option(help="Address to bind; anything but loopback exposes the guard.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    policy: Annotated[Path | None, typer.Option(help="Policy YAML (rails, thresholds, failure mode, limits, "
                                                        "audit log); default: the built-in policy.")] = None,
    calibration: Annotated[Path | None, typer.Option(
        help="Calibration file for the output rail (default: the one in the judge's judge.json).")] = None,
    audit_log: Annotated[Path | None, typer.Option(help="JSON Lines audit log (overrides the policy's).")] = None,
    client_api_key_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True,
        help=f"File holding the key clients must send as 'Authorization: Bearer KEY' (or set {CLIENT_KEY_ENV}).",
    )] = None,
    upstream_api_key_file: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, readable=True,
        help=f"File holding the API key the guard sends to the upstream (or set {UPSTREAM_KEY_ENV}).")] = None,
    insecure_no_auth: Annotated[bool, typer.Option(
        "--insecure-no-auth", help="Serve an address other than loopback without a client key.")] = False,
    lite_judge: LiteJudgeOption = None,
    cascade_band: CascadeBandOption = "0.1,0.9",
    engine: Engine = "transformers",
    served_model: ServedModel = None,
    *,
    given: Given,
):
    """Put the judge in front of a deployed VLM as an OpenAI-compatible guardrail (input and output rails)."""
    client_api_key = read_key(client_api_key_file, CLIENT_KEY_ENV, "--client-api-key-file")
    upstream_api_key = read_key(upstream_api_key_file, UPSTREAM_KEY_ENV, "--upstream-api-key-file")
    if not is_loopback(host):
        if client_api_key is None and not insecure_no_auth:
            raise MisguardError(f"--host {host} lets other machines use the guard: give clients a key "
                                f"({CLIENT_KEY_ENV} or --client-api-key-file), or pass --insecure-no-auth")
        typer.secho(f"warning: binding {host}: the guard is reachable from other machines"
                    + (" without a key" if client_api_key is None else " over plain HTTP (put TLS in front)"),
                    err=True, fg=typer.colors.YELLOW)
    service = build_service(judge, upstream, policy_path=policy, calibration_path=calibration, audit_log=audit_log,
                            engine=engine, options=given.build(EngineOptions), served_model=served_model,
                            upstream_api_key=upstream_api_key, lite_judge=lite_judge, cascade_band=cascade_band)
    typer.echo(f"misguard guard: judge {service.guard.judge_id} -> upstream {upstream}, on http://{host}:{port}/v1")
    run_server(create_app(service, api_key=client_api_key), host, port)


def is_loopback(host: str) -> bool:
    """Whether `host` is a loopback address (127.0.0.0/8, ::1) or "localhost"; any other name counts as exposed."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
