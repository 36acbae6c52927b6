"""`misguard serve`: the guard as an OpenAI-compatible server in front of a deployed VLM (the `guard` extra)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from misguard.cli.infer import Engine
from misguard.cli.options import Given, config_options
from misguard.cli.score import CascadeBandOption, LiteJudgeOption, ServedModel
from misguard.engines.base import EngineOptions
from misguard.guard.server.app import create_app, run_server
from misguard.guard.server.loading import build_service

commands = typer.Typer()
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@commands.command("serve")
@config_options(EngineOptions)
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
    client_api_key: Annotated[str | None, typer.Option(
        envvar="MISGUARD_SERVE_API_KEY", help="Clients must send 'Authorization: Bearer KEY'.")] = None,
    upstream_api_key: Annotated[str | None, typer.Option(
        envvar="MISGUARD_UPSTREAM_API_KEY", help="API key the guard sends to the upstream.")] = None,
    lite_judge: LiteJudgeOption = None,
    cascade_band: CascadeBandOption = "0.1,0.9",
    engine: Engine = "transformers",
    served_model: ServedModel = None,
    *,
    given: Given,
):
    """Put the judge in front of a deployed VLM as an OpenAI-compatible guardrail (input and output rails)."""
    service = build_service(judge, upstream, policy_path=policy, calibration_path=calibration, audit_log=audit_log,
                            engine=engine, options=given.build(EngineOptions), served_model=served_model,
                            upstream_api_key=upstream_api_key, lite_judge=lite_judge, cascade_band=cascade_band)
    if host not in LOOPBACK:
        typer.secho(f"warning: binding {host}: the guard is reachable from other machines", err=True,
                    fg=typer.colors.YELLOW)
    typer.echo(f"misguard guard: judge {service.guard.judge_id} -> upstream {upstream}, on http://{host}:{port}/v1")
    run_server(create_app(service, api_key=client_api_key), host, port)
