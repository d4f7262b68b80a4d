"""`keel up`: the hub and its dashboard on embedded defaults, with a demo compute service."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def up(
    port: Annotated[int, typer.Option(help="HTTP port on 127.0.0.1 (0 picks a free one).")] = 8780,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    data: Annotated[
        Path | None, typer.Option(help="Directory for the SQLite store (default: a temp dir).")
    ] = None,
    interval: Annotated[float, typer.Option(help="Seconds between demo lifecycle events.")] = 1.0,
) -> None:
    """Run the hub, its dashboard and a demo compute service for two tenants (Ctrl-C stops)."""
    try:
        from keel.hub import _up  # noqa: PLC0415 - keep `keel --help` fast; needs keel[hub]
    except ImportError as exc:
        typer.echo(f"keel up needs the hub extra: pip install 'keel[hub]' ({exc})", err=True)
        raise typer.Exit(2) from None
    from keel.errors import ConfigError  # noqa: PLC0415

    try:
        _up.main(host=host, port=port, data_dir=data, interval=interval)
    except ConfigError as exc:  # the port is taken, say
        typer.echo(f"keel up: {exc}", err=True)
        raise typer.Exit(2) from None


hub_app = typer.Typer(
    help="The event hub: notifications to users through subscriptions.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode=None,
)


@hub_app.command("serve")
def serve(
    *,
    store: Annotated[
        str,
        typer.Option(help="sqlite:///path/hub.db (one process) or postgresql://... (several)."),
    ],
    tokens: Annotated[
        Path | None,
        typer.Option(help='Token file: {"TOKEN": {"user", "project", "roles"}}.'),
    ] = None,
    keystone: Annotated[
        str | None,
        typer.Option(
            help="Validate tokens with Keystone v3 at this URL instead of --tokens; the "
            "service user's password comes from KEEL_KEYSTONE_PASSWORD."
        ),
    ] = None,
    keystone_user: Annotated[str, typer.Option(help="Keystone service user.")] = "keel-hub",
    keystone_project: Annotated[
        str, typer.Option(help="Project of the Keystone service user.")
    ] = "service",
    map_db: Annotated[
        Path | None,
        typer.Option(help="The services' KEEL_MAP_DB file: serve its live map at /map."),
    ] = None,
    transport: Annotated[
        str | None,
        typer.Option(help="Keel transport to ingest notifications from (memory://, rabbit://...)."),
    ] = None,
    topic: Annotated[
        list[str] | None, typer.Option(help="Topic on --transport (repeat; default notifications).")
    ] = None,
    oslo: Annotated[
        str | None,
        typer.Option(help="RabbitMQ URL of the OpenStack services' oslo.messaging notifications."),
    ] = None,
    oslo_topic: Annotated[
        list[str] | None,
        typer.Option(help="oslo topic (repeat; default notifications, versioned_notifications)."),
    ] = None,
    oslo_exchange: Annotated[
        list[str] | None,
        typer.Option(help="oslo control_exchange (repeat: nova, cinder, ...; default openstack)."),
    ] = None,
    oslo_durable: Annotated[
        bool, typer.Option(help="The services run with amqp_durable_queues = True.")
    ] = False,
    pool: Annotated[str, typer.Option(help="Queue (pool) name the hub consumes.")] = "keel-hub",
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port (0 picks a free one).")] = 8780,
    zaqar_key: Annotated[
        Path | None,
        typer.Option(
            help="File holding the Zaqar API's signed-URL secret (every hub process sharing "
            "a store needs the same; default: a new one per process)."
        ),
    ] = None,
    zaqar_confirm: Annotated[
        bool, typer.Option(help="Zaqar subscribers must confirm before they get messages.")
    ] = False,
    tls_cert: Annotated[
        Path | None,
        typer.Option(help="Serve HTTPS with this certificate chain (PEM); needs --tls-key."),
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option(help="The private key (PEM) of --tls-cert.")
    ] = None,
) -> None:
    """Serve the hub's API on a store, ingesting from Keel and OpenStack buses (Ctrl-C stops)."""
    from keel._log import configure  # noqa: PLC0415 - keep `keel --help` fast
    from keel.errors import ConfigError, KeelError  # noqa: PLC0415

    try:
        from keel.hub import _serve  # noqa: PLC0415 - needs keel[hub]
    except ImportError as exc:
        typer.echo(f"keel hub needs the hub extra: pip install 'keel[hub]' ({exc})", err=True)
        raise typer.Exit(2) from None
    options = _serve.ServeOptions(
        store=store,
        tokens=tokens,
        keystone=keystone,
        keystone_user=keystone_user,
        keystone_project=keystone_project,
        map_db=map_db,
        host=host,
        port=port,
        transport=transport,
        topics=topic or ("notifications",),
        oslo=oslo,
        oslo_topics=oslo_topic or _serve.OSLO_TOPICS,
        oslo_exchanges=oslo_exchange or ("openstack",),
        oslo_durable=oslo_durable,
        pool=pool,
        zaqar_key=zaqar_key,
        zaqar_confirm=zaqar_confirm,
        tls_cert=tls_cert,
        tls_key=tls_key,
    )
    configure()
    try:
        _serve.run_until_signalled(lambda stop: _serve.serve(options, stop))
    except ConfigError as exc:
        typer.echo(f"keel hub serve: {exc}", err=True)
        raise typer.Exit(2) from None
    except KeelError as exc:  # a backend that cannot be reached at start, ...
        typer.echo(f"keel hub serve: {type(exc).__name__}: {exc}", err=True)
        raise typer.Exit(1) from None
