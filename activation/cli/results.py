"""``activation results purge`` (retention by hand) and ``activation where`` (which spool the CLI
reads, and how it found it)."""

from __future__ import annotations

import click

from activation.cli.support import EXIT_USAGE, Context, Group, fail, pass_ctx, print_json


@click.group("results", cls=Group)
def results_group() -> None:
    """Manage the results folder (results/<worker>/); ACTIVATION_RESULT_TTL applies it automatically."""


@results_group.command("purge")
@click.option("--older-than", "older_than", required=True, metavar="DURATION", help="e.g. 7d, 12h, 30m, 90s.")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def results_purge(obj: Context, older_than: str, dry_run: bool, as_json: bool) -> None:
    """Delete results written more than DURATION ago (dead letters: `dlq purge`)."""
    from activation.orchestrator.recovery import parse_duration
    from activation.spool.retention import purge

    try:
        seconds = parse_duration(older_than)
    except ValueError as exc:
        fail(f"--older-than: {exc}", EXIT_USAGE)
    skipped: list[str] = []
    gone = purge(obj.spool, seconds, dry_run=dry_run, skipped=skipped)
    if skipped:  # stderr, so that --json stays one document
        click.echo(f"activation: {len(skipped)} expired result(s) could not be deleted, first {skipped[0]}", err=True)
    if as_json:
        print_json(
            {"dry_run": dry_run, "older_than_s": seconds, "purged": [g.as_dict() for g in gone], "skipped": skipped}
        )
        return
    verb = "would delete" if dry_run else "deleted"
    for item in gone[:20]:
        click.echo(f"{verb} {item.worker}/{item.task_id}")
    if len(gone) > 20:
        click.echo(f"... and {len(gone) - 20} more")
    click.echo(f"{len(gone)} result(s) {'would be deleted (dry run)' if dry_run else 'deleted'}")


@click.command("where")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@pass_ctx
def where_command(obj: Context, as_json: bool) -> None:
    """Say which spool this CLI uses, and how it found it."""
    root = obj.settings.spool
    found = obj.spool_found
    source = obj.source or "the default, ./var/spool"
    if as_json:
        print_json({"spool": str(root), "source": source, "exists": found})
    else:
        click.echo(f"spool {root} ({source})")
    if not found:
        fail(
            f"{root} is not an activation spool (no tasks/ folder): "
            "set ACTIVATION_SPOOL, run from the project, or `activation init`"
        )
