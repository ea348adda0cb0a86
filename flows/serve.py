"""Serve every flow of prefect.yaml with their schedules from this one process, without a work pool or worker.

    python flows/serve.py        # from the repository root; Ctrl-C stops it

Same deployment names, schedules, parameters and triggers (the on-drift automation) as prefect.yaml
(read from it, so there is one place to change a schedule). Runs execute as subprocesses of this process, in the repository root.
"""
from __future__ import annotations

import os
from pathlib import Path

import yaml
from prefect import serve
from prefect.flows import load_flow_from_entrypoint
from prefect.schedules import Cron

ROOT = Path(__file__).resolve().parent.parent


def deployments(prefect_yaml: Path = ROOT / "prefect.yaml") -> list:
    """`RunnerDeployment`s for every deployment in prefect.yaml (entrypoint, parameters, cron schedules, triggers)."""
    from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger

    result = []
    for spec in yaml.safe_load(prefect_yaml.read_text(encoding="utf-8"))["deployments"]:
        path, function = spec["entrypoint"].split(":")
        loaded = load_flow_from_entrypoint(f"{ROOT / path}:{function}")
        schedules = [Cron(s["cron"], timezone=s.get("timezone", "UTC")) for s in spec.get("schedules", []) if "cron" in s]
        result.append(
            loaded.to_deployment(
                name=spec["name"],
                description=spec.get("description"),
                parameters=spec.get("parameters") or {},
                tags=spec.get("tags") or [],
                schedules=schedules,
                triggers=[DeploymentEventTrigger(**t) for t in spec.get("triggers") or []],
            )
        )
    return result


if __name__ == "__main__":
    os.chdir(ROOT)  # flows default to repo=".": the repository this file belongs to
    serve(*deployments())
