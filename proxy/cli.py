"""The ``credproxy`` command line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TextIO

from proxy import audit as auditlog
from proxy.ca import ensure_ca
from proxy.errors import ConfigError, CoordinationUnavailable, CredproxyError
from proxy.settings import Settings, load_settings
from proxy.suspensions import Suspension
from proxy.timewindow import TimeWindow, WindowError, parse_window
from proxy.tokenset import TokenSet, TokenSetError
from proxy.vault.base import Grant, GrantInfo, GrantStatus
from proxy.vault.keys import generate_key

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A command line argparse cannot judge alone (exit 2, like argparse's own errors)."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "func"):
        parser.print_help()
        return EXIT_USAGE
    try:
        code: int = args.func(args)
        return code
    except (UsageError, WindowError) as exc:  # WindowError: --since / --until
        print(f"credproxy: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except CredproxyError as exc:
        print(f"credproxy: {exc}", file=sys.stderr)
        return EXIT_FAIL
    except OSError as exc:
        # A file or socket the command needed, not caught nearer: name it, no traceback.
        what = f"{exc.filename}: " if exc.filename else ""
        print(f"credproxy: {what}{exc.strerror or exc}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


def _settings(args: argparse.Namespace) -> Settings:
    path = args.config or os.environ.get("CREDPROXY_CONFIG")
    if not path:
        raise CredproxyError("no configuration: pass --config FILE or set CREDPROXY_CONFIG")
    return load_settings(path)


def cmd_run(args: argparse.Namespace) -> int:
    import logging
    import signal

    from proxy import logs

    listener = logs.configure(sys.stderr)
    logging.getLogger("mitmproxy").setLevel(logging.WARNING)
    # SIGHUP reloads once serving (addons/embed.py); before that it must not kill the process.
    signal.signal(signal.SIGHUP, lambda *_: logging.getLogger("credproxy").warning(
        "SIGHUP during start-up ignored; send it again once credproxy is listening"))
    try:
        return _run(args)
    finally:
        listener.stop()


def _run(args: argparse.Namespace) -> int:
    import logging

    from addons.embed import serve  # mitmproxy is imported only when serving
    from proxy.app import build, check_ports

    settings = _settings(args)
    config_path = args.config or os.environ["CREDPROXY_CONFIG"]
    check_ports(settings)
    _raise_fd_limit()
    if not settings.providers:
        logging.getLogger("credproxy").warning(
            "no providers configured: every destination is unrouted (%s)", settings.unrouted)

    async def go() -> None:
        # Everything build checks (keys, secrets, vault, audit directory) is checked
        # before anything is created on disk (the CA).
        app = build(settings)
        try:
            ensure_ca(settings.ca_dir)
            try:
                await app.start(config_path=str(Path(config_path).expanduser()))
            except OSError as exc:
                raise CredproxyError(f"admin: cannot listen on {settings.admin}: "
                                     f"{exc.strerror}") from None
            await serve(settings, app, grace=args.grace)
        finally:
            st = app.sidecar.broker.stats
            logging.getLogger("credproxy").info(
                "broker stats: vault_reads=%d shared_hits=%d refreshes=%d",
                st.vault_reads, st.shared_hits, st.refreshes)
            await app.aclose()

    asyncio.run(go())
    return EXIT_OK


def _raise_fd_limit() -> None:
    """Each proxied request holds two sockets; the common soft limit of 1024 open files
    caps a proxy at ~500 concurrent requests. Raise it to the hard limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep the soft limit; not fatal


def cmd_providers(args: argparse.Namespace) -> int:
    """List the built-in provider catalog (proxy/catalog/*.yaml; docs/providers.md)."""
    from proxy.dialect import describe_catalog

    entries = describe_catalog()
    if args.json:
        print(json.dumps(entries, indent=2))
        return EXIT_OK
    for e in entries:
        if "error" in e:
            print(f"{e['id']}: unreadable catalog entry: {e['error']}")
            continue
        needs = ", ".join(e["parameters"]) or "-"
        defaults = ", ".join(f"{k}={v}" for k, v in e["parameter_defaults"].items()) or "-"
        bound = (f"\n{'':<16} each grant bound to: {', '.join(e['grant_hosts'])} "
                 f"(within the hosts above)" if e["grant_hosts"] else "")
        values = (f"\n{'':<16} grant values: {', '.join(e['grant_values'])}"
                  if e["grant_values"] else "")
        print(f"{e['id']:<16} {e['title']}\n{'':<16} hosts: {', '.join(e['hosts'])}"
              f"{bound}{values}\n"
              f"{'':<16} parameters needed: {needs}; defaults: {defaults}; "
              f"revocation: {e['revocation']}")
    print("\nUse one with `- provider: <id>` plus client_id, client_secret_env (or _file) "
          "and the parameters it needs (docs/providers.md).")
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from proxy.app import build

    settings = _settings(args)
    print(f"config: ok ({len(settings.providers)} providers)")
    if not settings.providers:
        print("warning: no providers configured: every destination is unrouted",
              file=sys.stderr)

    async def go() -> None:
        app = build(settings)  # resolves secrets and keys, opens the vault
        try:
            print("identity keys: ok; client secrets: ok")
            await app.vault.check()
            print(f"vault ({settings.vault.backend}): ok")
            c = settings.coordination
            what = c.backend if c.backend == "memory" else (
                f"redis {c.mode}" + (", slot-safe keys" if c.slotted else "")
                + (f", locks confirmed by {c.acks} replica(s)" if c.acks else "")
                + (", Entra ID" if c.entra_id is not None else ""))
            try:
                await app.coordinator.check()
            except CredproxyError as exc:
                raise CredproxyError(f"coordination ({what}): {exc}") from exc
            print(f"coordination ({what}): ok")
        finally:
            await app.aclose()

    asyncio.run(go())
    cert = ensure_ca(settings.ca_dir)
    print(f"ca: ok ({cert})")
    return EXIT_OK


def cmd_ca(args: argparse.Namespace) -> int:
    settings = _settings(args)
    sys.stdout.write(ensure_ca(settings.ca_dir).read_text(encoding="ascii"))
    return EXIT_OK


def cmd_vault_put(args: argparse.Namespace) -> int:
    from proxy.app import build

    settings = _settings(args)
    settings.provider(args.provider)  # must exist
    try:
        data = json.loads(sys.stdin.read())
        tokens = TokenSet.from_response(data, now=time.time())
    except (ValueError, TokenSetError) as exc:
        # json errors quote the input, which holds tokens: say only where it failed.
        msg = str(exc) if isinstance(exc, TokenSetError) else "stdin is not valid JSON"
        raise CredproxyError(f"vault put: {msg}") from None

    given: dict[str, str] = {}
    for item in args.value:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--value {item!r}: give NAME=VALUE")
        given[name] = value

    async def go() -> None:
        from proxy.binding import BindingError
        from proxy.connect import imported_values

        app = build(settings)
        try:
            current = await app.vault.get(args.user, args.provider)
            provider = settings.provider(args.provider)
            try:
                values = imported_values(provider, given,
                                         current.values if current is not None else {})
            except BindingError as exc:
                raise CredproxyError(f"vault put: {exc.detail} ({exc.reason})") from None
            # A grant minted by a registered confidential client (an MCP server's) keeps
            # that client's secret while it keeps naming that client.
            kept = (current.client_secret if current is not None and values.get(
                "mcp_client_id") == current.values.get("mcp_client_id") else None)
            stored = await app.vault.put(Grant(user=args.user, provider=args.provider,
                                               tokens=tokens, values=values,
                                               client_secret=kept))
            # Replicas drop what they cached of the grant it replaces (it may have been
            # bound to another tenant); without Redis, the vault's epoch tells them.
            try:
                await app.coordinator.cache_put(stored)
                await app.coordinator.publish_invalidation(args.user, args.provider)
            except CoordinationUnavailable:
                print("credproxy: Redis unreachable: replicas learn of the new grant "
                      "when their cached copy expires", file=sys.stderr)
            app.sidecar.audit.record(auditlog.CONNECTION_CREATED, user=args.user,
                                     provider=args.provider, outcome="stored",
                                     reason="imported", token=tokens.access_token,
                                     token_source="vault", actor=auditlog.cli_actor())
            print(f"stored {args.provider} for {args.user} (version {stored.version})",
                  file=sys.stderr)
        finally:
            await app.aclose()

    asyncio.run(go())
    return EXIT_OK


def cmd_connections(args: argparse.Namespace) -> int:
    from proxy.app import open_vault

    settings = _settings(args)

    suspensions = _read_suspensions(settings)

    def suspended(r: GrantInfo) -> Suspension | None:
        return next((s for s in suspensions or [] if (s.kind, s.value) in (
            ("user", r.user), ("provider", r.provider))), None)

    async def go() -> None:
        vault, _ = open_vault(settings)
        try:
            rows = [_as_served(settings, r) for r in await vault.list(args.user)]
        finally:
            await vault.close()
        if args.json:
            for r in rows:
                hit = suspended(r)
                print(json.dumps({"user": r.user, "provider": r.provider, "status": r.status,
                                  "suspended": ("unknown" if suspensions is None else
                                                {"kind": hit.kind, "since": hit.since_text(),
                                                 "by": hit.by, "reason": hit.reason}
                                                if hit is not None else None),
                                  "reason": r.reason, "scope": r.scope,
                                  "expires_at": r.expires_at,
                                  "has_refresh_token": r.has_refresh_token,
                                  "updated_at": r.updated_at,
                                  "values": {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in r.values.items()},
                                  "resources": {rid: {"scope": x.scope,
                                                      "expires_at": x.expires_at}
                                                for rid, x in r.resources.items()}}))
            return
        print(f"{'USER':<24} {'PROVIDER':<14} {'STATUS':<16} {'SUSPENDED':<30} "
              f"{'EXPIRES':<20} REFRESH SCOPE")
        for r in rows:
            exp = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(r.expires_at))
                   if r.expires_at else "-")
            hit = suspended(r)
            paused = ("unknown" if suspensions is None else
                      f"{hit.kind} since {hit.since_text()}" if hit is not None else "-")
            print(f"{r.user:<24} {r.provider:<14} {r.status:<16} {paused:<30} {exp:<20} "
                  f"{'yes' if r.has_refresh_token else 'no':<7} {r.scope or '-'}")
            for name, value in sorted(r.values.items()):
                shown = ", ".join(value) if isinstance(value, tuple) else value
                print(f"{'':<24} {'':<14} value {name} = {shown}")
            for rid, x in sorted(r.resources.items()):
                rexp = (time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(x.expires_at))
                        if x.expires_at else "-")
                print(f"{'':<24} {'':<14} resource {rid}: expires {rexp}, scope "
                      f"{x.scope or '-'}")

    asyncio.run(go())
    contexts = [x for x in suspensions or [] if x.kind == "context"]
    if contexts and not args.json:
        print(f"{len(contexts)} user context(s) suspended as well (credproxy suspensions)",
              file=sys.stderr)
    return EXIT_OK if suspensions is not None else EXIT_FAIL


def _as_served(settings: Settings, info: GrantInfo) -> GrantInfo:
    """``info`` with the status requests get: an active grant the running configuration
    cannot use (a value missing since its provider started binding grants, a host outside
    a narrowed ceiling) is shown as needing re-authorization, with the reason."""
    provider = next((p for p in settings.providers if p.id == info.provider), None)
    if provider is None or info.status is not GrantStatus.ACTIVE:
        return info
    problem = provider.binding_problem(info.values)
    if problem is None:
        return info
    return replace(info, status=GrantStatus.REAUTH_REQUIRED, reason=problem.reason)


def _lines(path: str | None, follow: bool) -> Iterator[str]:
    if path in (None, "-"):
        yield from sys.stdin
        return
    assert path is not None
    try:
        f: TextIO = open(path, encoding="utf-8", errors="replace")  # noqa: SIM115
    except OSError as exc:
        raise CredproxyError(f"cannot read {path}: {exc.strerror}") from exc
    with f:
        while True:
            line = f.readline()
            if line:
                yield line
            elif follow:
                time.sleep(0.25)
            else:
                return


def _window(args: argparse.Namespace) -> TimeWindow | None:
    """``--since`` / ``--until`` (proxy.timewindow); raises WindowError (exit 2)."""
    if args.since is None and args.until is None:
        return None
    return parse_window(args.since, args.until)


def _audit_files(files: Sequence[str]) -> auditlog.LogFiles | None:
    """The files named (oldest first), or None for stdin (none given, or ``-``)."""
    if not files or list(files) == ["-"]:
        return None
    if "-" in files:
        raise UsageError("give either files or - (stdin), not both")
    return auditlog.LogFiles(files)


def cmd_audit_tail(args: argparse.Namespace) -> int:
    from proxy import auditexport

    window = _window(args)
    for _, parsed, _err in auditlog.parse_lines(_lines(args.file, args.follow)):
        # OCSF events as exported (audit export, a SIEM) carry the record: read that.
        rec = auditexport.unwrap(parsed) if parsed is not None else None
        if not isinstance(rec, dict) or not auditlog.matches(
                rec, user=args.user, provider=args.provider, event=args.event):
            continue
        if window is not None and window.position(rec.get("ts")) != 0:
            continue
        print(json.dumps(rec) if args.json else auditlog.format_record(rec), flush=True)
    return EXIT_OK


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from proxy import auditexport, checkpoint

    window = _window(args)
    files = _audit_files(args.files)
    lines: Iterable[str] = files if files is not None else sys.stdin
    check: checkpoint.CheckpointCheck | None = None
    if args.key:
        try:
            external = checkpoint.read_external(args.checkpoints)
        except OSError as exc:
            raise CredproxyError(f"audit verify: cannot read {exc.filename}: "
                                 f"{exc.strerror}") from exc
        except checkpoint.ExternalUnusable as exc:
            print(f"BROKEN: --checkpoints {exc}")
            return EXIT_FAIL
        check = checkpoint.CheckpointCheck(checkpoint.load_public_keys(args.key), external,
                                           allow_partial=args.allow_partial)
    elif args.checkpoints or args.require_proof:
        raise CredproxyError("audit verify: --checkpoints and --require-proof need --key "
                             "PUB.pem (the checkpoint signing key's public half)")
    try:
        report = auditlog.verify(lines, allow_partial=args.allow_partial, window=window,
                                 check=check.see if check is not None else None,
                                 unwrap=auditexport.unwrap, any_order=args.any_order)
    except (OSError, EOFError) as exc:
        name = files.reading if files is not None else "stdin"
        raise CredproxyError(f"audit verify: cannot read {name}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
    errors, unproven = check.finish() if check is not None else ([], [])
    if not report.ok:
        print(_verified(report, window, files))
    for error in errors:
        print(f"BROKEN: {error}")
    for u in unproven:
        after = (f"after the last checkpoint (seq {u.last_checkpoint})"
                 if u.last_checkpoint else "and no checkpoint")
        print(f"{'UNPROVEN' if args.require_proof else 'warning'}: instance {u.instance}: "
              f"{u.records} records {after} are unproven (a deletion of them would not "
              "show)")
    if not report.ok or errors or (args.require_proof and unproven):
        return EXIT_FAIL
    print(_verified(report, window, files,
                    check.checkpoints if check is not None else None))
    return EXIT_OK


def _verified(report: auditlog.VerifyReport, window: TimeWindow | None,
              files: auditlog.LogFiles | None, checkpoints: int | None = None) -> str:
    """What ``audit verify`` prints: ``ok: ...`` (and a note), or ``BROKEN: ...``."""
    if report.ok:
        what = (f"{report.records} records" if window is None else
                f"{report.in_window} records in the window {window.describe()} "
                f"(of {report.records} read)")
        text = (f"ok: {what} in {report.instances} chains verified"
                + (f" over {len(files.paths)} files"
                   if files is not None and len(files.paths) > 1 else "")
                + (f", {checkpoints} signed checkpoints" if checkpoints is not None else "")
                + (f" ({report.skipped_lines} non-record lines ignored)"
                   if report.skipped_lines else ""))
        if report.outside_breaks:
            text += (f"\nnote: {report.outside_breaks} broken records outside the window; "
                     "run without --since/--until to see the first")
        return text
    e = report.first_error
    assert e is not None
    where = f"line {e.line}"
    if files is not None and len(files.paths) > 1:
        name, line = files.where(e.line)
        where = f"{name} line {line}"
    return f"BROKEN: {where} (instance {e.instance}, seq {e.seq}): {e.reason}"


def cmd_audit_report(args: argparse.Namespace) -> int:
    """What each user's agent accessed in the window (proxy.auditreport)."""
    from proxy import auditreport

    window = _window(args)
    if args.depth < 1:
        raise UsageError(f"--depth {args.depth}: give 1 or more path segments")
    files = _audit_files(args.files)
    lines: Iterable[str] = files if files is not None else sys.stdin
    builder = auditreport.ReportBuilder(window=window, user=args.user,
                                        provider=args.provider, depth=args.depth)
    checked: auditlog.VerifyReport | None = None
    try:
        if args.verify:
            # One read of the input (stdin cannot be read twice): each line goes to the
            # report on its way through the chain check.
            def passing(source: Iterable[str]) -> Iterator[str]:
                for line in source:
                    builder.feed(line)
                    yield line

            checked = auditlog.verify(passing(lines), window=window,
                                      allow_partial=args.allow_partial)
        else:
            for line in lines:
                builder.feed(line)
    except (OSError, EOFError) as exc:
        name = files.reading if files is not None else "stdin"
        raise CredproxyError(f"audit report: cannot read {name}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from exc
    report = builder.report()
    render = {"table": auditreport.to_table, "json": auditreport.to_json,
              "csv": auditreport.to_csv}[args.format]
    sys.stdout.write(render(report) + ("\n" if args.format == "json" else ""))
    sys.stdout.flush()
    if args.format == "csv":
        print(auditreport.describe_input(report), file=sys.stderr)
    bad = report.input
    if bad.unreadable:
        where = [f"{n}:{line}" if files is not None and len(files.paths) > 1 else
                 f"line {line}" for n, line in
                 ((files.where(x) if files is not None else ("stdin", x))
                  for x in bad.unreadable_lines)]
        print(f"credproxy: audit report: {bad.unreadable} lines that look like records "
              f"could not be read ({', '.join(where)}"
              f"{', ...' if bad.unreadable > len(where) else ''}): the report may be "
              "incomplete; `credproxy audit verify` names what is wrong", file=sys.stderr)
    if checked is not None:
        print(f"verify: {_verified(checked, window, files)}", file=sys.stderr)
    return EXIT_FAIL if bad.unreadable or (checked is not None and not checked.ok) else EXIT_OK


def cmd_audit_export(args: argparse.Namespace) -> int:
    from proxy import auditexport

    files = _audit_files(args.files)
    lines: Iterable[str] = files if files is not None else sys.stdin
    for line in auditexport.ocsf_lines(lines):
        print(line)
    return EXIT_OK


def cmd_audit_keygen(args: argparse.Namespace) -> int:
    """Write a new Ed25519 checkpoint signing key (0600) and print its public half."""
    from proxy import checkpoint

    pem = checkpoint.generate_pem()
    try:
        fd = os.open(args.out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CredproxyError(f"{args.out} exists; not overwriting a signing key") from None
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    signer = checkpoint.Signer.from_pem(pem, args.out)
    public = signer.public_pem()
    if args.public:
        Path(args.public).write_text(public, encoding="ascii")
    print(public, end="")
    print(f"key id {signer.key_id}", file=sys.stderr)
    return EXIT_OK


def cmd_connect(args: argparse.Namespace) -> int:
    """Authorization code + PKCE for a person at a terminal (like `gh auth login`): print the
    authorize URL, listen on a loopback redirect (RFC 8252), exchange, store."""
    import webbrowser

    from aiohttp import web

    from proxy.app import build
    from proxy.connect import Connected, ConnectRejected

    settings = _settings(args)
    choices: dict[str, str] = {}
    for item in args.value:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--value {item!r}: give NAME=VALUE")
        spec = settings.provider(args.provider).grant_values.get(name)
        if spec is None or spec.source != "choice":
            raise ConfigError(f"--value {name}: {args.provider} has no grant value {name!r} "
                              "chosen at connect time")
        choices[spec.param or name] = value

    async def go() -> int:
        app = build(settings)
        done: asyncio.Future[Connected | ConnectRejected] = (
            asyncio.get_running_loop().create_future())

        async def callback(request: web.Request) -> web.Response:
            try:
                result: Connected | ConnectRejected = await app.connector.complete(
                    dict(request.query), actor=auditlog.cli_actor())
                text, status = "Connected. You can close this window.", 200
            except ConnectRejected as exc:
                result, text, status = exc, f"Connection failed: {exc.detail}", 400
            if not done.done():
                done.set_result(result)
            return web.Response(text=text, status=status,
                                headers={"Cache-Control": "no-store"})

        server = web.Application()
        server.router.add_get("/oauth/callback", callback)
        runner = web.AppRunner(server, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", args.port)
        await site.start()
        port = runner.addresses[0][1]
        try:
            url = await app.connector.begin(
                args.user, args.provider,
                redirect_uri=f"http://127.0.0.1:{port}/oauth/callback",
                scopes=args.scope or None, choices=choices, actor=auditlog.cli_actor())
            print(f"To connect {args.user} to {args.provider}, open this URL in a browser:\n"
                  f"\n  {url}\n\nWaiting for the sign-in to finish "
                  f"(redirect to http://127.0.0.1:{port}/oauth/callback)...",
                  file=sys.stderr, flush=True)
            if args.open:
                webbrowser.open(url)
            try:
                result = await asyncio.wait_for(done, timeout=args.timeout)
            except TimeoutError:
                print("credproxy: the sign-in did not finish in time", file=sys.stderr)
                return EXIT_FAIL
            if isinstance(result, ConnectRejected):
                print(f"credproxy: connection failed: {result.detail} ({result.reason})",
                      file=sys.stderr)
                return EXIT_FAIL
            print(f"connected {result.user} to {result.provider} (scope: "
                  f"{result.scope or '-'})", file=sys.stderr)
            if result.missing_scopes:
                # Reported now, not at the agent's first failing call; non-zero for scripts.
                print(f"credproxy: {result.provider} did not grant the required scopes "
                      f"{' '.join(result.missing_scopes)} (providers[{result.provider}]."
                      "required_scopes): the grant is stored, but calls that need them will "
                      "fail; connect again and approve them", file=sys.stderr)
                return EXIT_FAIL
            return EXIT_OK
        except ConnectRejected as exc:
            print(f"credproxy: {exc.detail} ({exc.reason})", file=sys.stderr)
            return EXIT_FAIL
        finally:
            await runner.cleanup()
            await app.aclose()

    return asyncio.run(go())


def cmd_revoke(args: argparse.Namespace) -> int:
    from proxy.app import build

    settings = _settings(args)

    async def go() -> int:
        app = build(settings)
        try:
            if args.provider:
                settings.provider(args.provider)
            results = await app.offboarder.revoke(args.user, args.provider,
                                                  dry_run=args.dry_run,
                                                  actor=auditlog.cli_actor())
        finally:
            await app.aclose()
        if not results:
            print(f"{args.user} has no connections"
                  + (f" to {args.provider}" if args.provider else ""), file=sys.stderr)
            return EXIT_OK
        for r in results:
            if args.dry_run:
                print(f"would revoke: {r.user} / {r.provider}"
                      + (" (corrupt record: would be deleted; its tokens are unreadable, "
                         "revoke them at the provider)" if r.corrupt else ""))
            elif not r.ok:
                done = ("removed locally" if r.removed else
                        "marked for re-authorization" if r.marked else "not revoked")
                print(f"{r.provider}: {done}; {', '.join(r.problems)}: {r.detail}")
            else:
                print(f"{r.provider}: removed; upstream {r.upstream}: {r.detail}")
        return EXIT_OK if all(r.ok for r in results) else EXIT_FAIL

    return asyncio.run(go())


def _suspension_subject(kind: str, value: str) -> dict[str, object]:
    """The audit record's user / provider / context for a suspension of ``kind``."""
    return {"user": value if kind == "user" else None,
            "provider": value if kind == "provider" else None,
            "context": auditlog.ContextInfo(kind="", id=value) if kind == "context" else None}


def _suspension_target(kind: str, value: str) -> str:
    return {"user": f"user {value}", "context": f"user context {value}",
            "provider": f"provider {value} (every user)"}[kind]


def cmd_suspend(args: argparse.Namespace) -> int:
    """The kill switch (proxy/suspensions.py): store a suspension where every replica
    reads it, then audit ``suspension.added``. Nothing is reported suspended that was not
    stored (Redis unreachable: exit 1, nothing changed)."""
    from proxy.app import build, suspension_store
    from proxy.suspensions import (
        READER_GRACE,
        FileSuspensionStore,
        Suspension,
        check_reason,
        selector,
    )

    kind, value = selector(args.user, args.context_id, args.provider)
    reason = check_reason(args.reason)
    settings = _settings(args)
    if kind == "provider":
        settings.provider(value)  # ConfigError naming the configured ids' key
    actor = auditlog.cli_actor()

    async def go() -> int:
        app = build(settings)
        try:
            store = suspension_store(settings, app.coordinator)
            if isinstance(store, FileSuspensionStore) and settings.vault.backend != "local" \
                    and not store.read_recently(READER_GRACE):
                # Beside a local vault the file is where every proxy of that vault looks,
                # now or at its next start. With Key Vault and no Redis it is this host's:
                # a suspension no proxy reads would be a false "suspended".
                raise CredproxyError(
                    f"NOT suspended (nothing changed): no proxy on this host reads "
                    f"{store.path} (with Key Vault and no Redis, suspensions are kept per "
                    "host): run this where the proxy runs (kubectl exec into its "
                    "container), or configure coordination.backend: redis")
            suspension = Suspension(kind, value, time.time(), f"{actor.kind}:{actor.id}",
                                    reason)
            try:
                old = await store.add_suspension(suspension)
            except CredproxyError as exc:
                raise CredproxyError(f"NOT suspended (nothing changed): {exc}") from None
            try:
                app.sidecar.audit.record(auditlog.SUSPENSION_ADDED, outcome="suspended",
                                         detail=reason, actor=actor,
                                         **_suspension_subject(kind, value))  # type: ignore[arg-type]
            except CredproxyError as exc:
                raise CredproxyError(f"{_suspension_target(kind, value)} IS suspended, but "
                                     f"the audit record could not be written: {exc}") from None
        finally:
            await app.aclose()
        again = (f" (replacing the suspension set {old.since_text()} by {old.by})"
                 if old is not None else "")
        bound = ("every replica refuses its requests within 1 s" if store.name == "redis"
                 else "the running proxy refuses its requests within 1 s")
        print(f"suspended {_suspension_target(kind, value)} since "
              f"{suspension.since_text()}{again}: {bound}; grants are kept (credproxy "
              "resume restores access)", file=sys.stderr)
        return EXIT_OK

    return asyncio.run(go())


def cmd_resume(args: argparse.Namespace) -> int:
    """Lift a suspension and audit ``suspension.lifted``; exit 1 when none was in force."""
    from proxy.app import build, suspension_store
    from proxy.suspensions import check_reason, selector

    kind, value = selector(args.user, args.context_id, args.provider)
    reason = check_reason(args.reason)
    settings = _settings(args)
    actor = auditlog.cli_actor()

    async def go() -> int:
        app = build(settings)
        try:
            store = suspension_store(settings, app.coordinator)
            try:
                old = await store.lift_suspension(kind, value)
            except CredproxyError as exc:
                raise CredproxyError(f"NOT resumed (nothing changed): {exc}") from None
            if old is None:
                print(f"credproxy: {_suspension_target(kind, value)} is not suspended; "
                      "nothing changed (credproxy suspensions lists those in force)",
                      file=sys.stderr)
                return EXIT_FAIL
            try:
                app.sidecar.audit.record(auditlog.SUSPENSION_LIFTED, outcome="resumed",
                                         detail=reason, actor=actor,
                                         **_suspension_subject(kind, value))  # type: ignore[arg-type]
            except CredproxyError as exc:
                raise CredproxyError(f"{_suspension_target(kind, value)} IS resumed, but "
                                     f"the audit record could not be written: {exc}") from None
        finally:
            await app.aclose()
        print(f"resumed {_suspension_target(kind, value)} (suspended since "
              f"{old.since_text()} by {old.by})", file=sys.stderr)
        return EXIT_OK

    return asyncio.run(go())


def _read_suspensions(settings: Settings) -> list[Suspension] | None:
    """The suspensions in force, from the store the proxies read; None (and a warning on
    stderr) when it cannot be read."""
    from proxy.app import open_vault, suspension_store
    from proxy.coordination import MemoryCoordinator
    from proxy.coordination.base import Coordinator

    async def go() -> list[Suspension] | None:
        coordinator: Coordinator = MemoryCoordinator()
        if settings.coordination.backend == "redis":
            from proxy.app import make_coordinator

            vault, key = open_vault(settings)
            await vault.close()
            coordinator = make_coordinator(settings, key)
        try:
            return await suspension_store(settings, coordinator).load_suspensions()
        except CredproxyError as exc:
            print(f"credproxy: suspensions cannot be read: {exc}", file=sys.stderr)
            return None
        finally:
            await coordinator.close()

    return asyncio.run(go())


def cmd_suspensions(args: argparse.Namespace) -> int:
    items = _read_suspensions(_settings(args))
    if items is None:
        return EXIT_FAIL
    items.sort(key=lambda s: (s.kind, s.value))
    if args.json:
        for s in items:
            print(json.dumps({**s.as_dict(), "since": s.since_text()}))
        return EXIT_OK
    if not items:
        print("no suspensions in force", file=sys.stderr)
        return EXIT_OK
    print(f"{'KIND':<9} {'SUSPENDED':<24} {'SINCE':<20} {'BY':<28} REASON")
    for s in items:
        print(f"{s.kind:<9} {s.value:<24} {s.since_text():<20} {s.by:<28} {s.reason}")
    return EXIT_OK


def cmd_vault_init(args: argparse.Namespace) -> int:
    from proxy.app import init_vault

    path = init_vault(_settings(args))
    print(f"created an empty vault: {path} (back it up with the vault key; credproxy "
          "refuses to start if it goes missing or empty)", file=sys.stderr)
    return EXIT_OK


def cmd_vault_keygen(args: argparse.Namespace) -> int:
    print(generate_key())
    return EXIT_OK


def cmd_context_keygen(args: argparse.Namespace) -> int:
    from proxy.devkeys import write_dev_keys

    priv, pub = write_dev_keys(Path(args.out_dir), alg=args.alg)
    print(f"private key: {priv}\npublic JWKS (identity.jwks_file): {pub}", file=sys.stderr)
    return EXIT_OK


def cmd_context_mint(args: argparse.Namespace) -> int:
    from proxy.devkeys import mint

    issuer, audience, typ = args.issuer, args.audience, "user-context+jwt"
    if args.config or os.environ.get("CREDPROXY_CONFIG"):
        ident = _settings(args).identity
        issuer, audience = issuer or ident.issuer, audience or ident.audience
        typ = ident.typ or typ
    if not issuer or not audience:
        raise CredproxyError("context mint: give --issuer and --audience, or --config")
    token = mint(
        key_file=args.key, hs256_secret_env=args.hs256_secret_env, sub=args.user,
        issuer=issuer, audience=audience, ttl=args.ttl, typ=typ,
        ctx_kind=args.ctx_kind, ctx_id=args.ctx_id,
        providers=args.providers.split(",") if args.providers else None,
        jti=args.jti,
    )
    print(token.reveal())
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from devstack.demo import run_demo

    code: int = run_demo(workdir=Path(args.workdir), keep=args.keep)
    return code


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="credproxy",
                                description="Per-user credential injection for AI agents.")
    sub = p.add_subparsers(metavar="COMMAND")

    def command(name: str, func: object, help: str, parent: object = sub,
                config: bool = True) -> argparse.ArgumentParser:
        sp: argparse.ArgumentParser = parent.add_parser(name, help=help,  # type: ignore[attr-defined]
                                                        description=help)
        if config:
            sp.add_argument("--config", "-c", help="config file (default: $CREDPROXY_CONFIG)")
        sp.set_defaults(func=func)
        return sp

    run = command("run", cmd_run, "run the sidecar proxy (reloads the config file on change)")
    run.add_argument("--grace", type=float, default=25.0,
                     help="seconds in-flight requests may take to finish after SIGTERM")
    command("check", cmd_check, "validate config, keys, secrets, vault and coordination")
    providers = command("providers", cmd_providers, "list the built-in provider catalog",
                        config=False)
    providers.add_argument("--json", action="store_true", help="as JSON")
    command("ca", cmd_ca, "print the CA certificate agents must trust (created if absent)")

    vault = sub.add_parser("vault", help="manage stored grants").add_subparsers(metavar="CMD")
    put = command("put", cmd_vault_put, "import a token set (JSON on stdin) for a user",
                  parent=vault)
    put.add_argument("--user", required=True)
    put.add_argument("--provider", required=True)
    put.add_argument("--value", action="append", metavar="NAME=VALUE", default=[],
                     help="a grant value (docs/tenants.md), checked as at connect time; "
                          "the values of the grant replaced are kept otherwise")
    command("keygen", cmd_vault_keygen, "print a new random vault key", parent=vault,
            config=False)
    command("init", cmd_vault_init, "create the local vault file (first run only; an "
            "existing file, even empty, is never replaced)", parent=vault)

    conn = command("connect", cmd_connect,
                   "connect a user to a provider (authorization code + PKCE, loopback redirect)")
    conn.add_argument("--user", required=True)
    conn.add_argument("--provider", required=True)
    conn.add_argument("--scope", action="append",
                      help="a scope to ask for instead of the default ones, within "
                           "providers[].scope_ceiling (repeatable)")
    conn.add_argument("--value", action="append", metavar="NAME=VALUE", default=[],
                      help="a grant value chosen at connect time (from: choice), e.g. "
                           "shop=acme.myshopify.com (repeatable; docs/tenants.md)")
    conn.add_argument("--open", action="store_true", help="open the URL in a browser")
    conn.add_argument("--port", type=int, default=0, help="loopback port (default: any)")
    conn.add_argument("--timeout", type=float, default=300.0)

    rev = command("revoke", cmd_revoke,
                  "offboard: revoke upstream (RFC 7009), delete, invalidate every replica")
    rev.add_argument("--user", required=True)
    rev.add_argument("--provider", help="only this provider (default: all of the user's)")
    rev.add_argument("--dry-run", action="store_true", help="list what would be revoked")

    for name, func, what in (
            ("suspend", cmd_suspend, "kill switch: refuse every credentialed request of a "
             "user, a user context (one chat or workflow run) or a provider, on every "
             "replica within 1 s; grants are kept"),
            ("resume", cmd_resume, "lift a suspension (no re-consent needed)")):
        sp = command(name, func, what)
        sp.add_argument("--user", help="the user id (the user context's sub)")
        sp.add_argument("--context-id", help="one user context's id (its ctx id claim)")
        sp.add_argument("--provider", help="a configured provider id (every user of it)")
        sp.add_argument("--reason", help="why (required; audited with who ran the "
                                         "command, never shown to agents)")
    susp = command("suspensions", cmd_suspensions, "list the suspensions in force")
    susp.add_argument("--json", action="store_true", help="one JSON object per line")

    conns = command("connections", cmd_connections, "list grants (never token values)")
    conns.add_argument("--user")
    conns.add_argument("--json", action="store_true", help="one JSON object per line")

    audit = sub.add_parser("audit", help="read the audit log").add_subparsers(metavar="CMD")
    tail = command("tail", cmd_audit_tail, "filter and show audit records", parent=audit,
                   config=False)
    tail.add_argument("file", nargs="?", help="audit file (default: stdin)")
    tail.add_argument("--follow", "-f", action="store_true")
    tail.add_argument("--user")
    tail.add_argument("--provider")
    tail.add_argument("--event", help="event or prefix, e.g. credential. or reauth.required")
    tail.add_argument("--json", action="store_true", help="print records as JSON")
    window_help = ("RFC 3339 time with its offset (2026-11-24T09:00:00Z) or a duration back "
                   "from now (90s, 15m, 12h, 7d, 2w); the window is [since, until)")

    def window_flags(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--since", metavar="TIME", help=f"records from TIME on: {window_help}")
        sp.add_argument("--until", metavar="TIME", help="records before TIME")

    window_flags(tail)
    verify = command("verify", cmd_audit_verify, "check the hash chain", parent=audit,
                     config=False)
    verify.add_argument("files", nargs="*", metavar="FILE",
                        help="audit files, oldest first (rotated ones too, .gz allowed; "
                             "default: stdin)")
    verify.add_argument("--allow-partial", action="store_true",
                        help="accept chains that start mid-way (a tailed log, rotated "
                             "files already deleted)")
    window_flags(verify)
    report = command("report", cmd_audit_report,
                     "what each user's agent accessed: per provider and context, requests "
                     "by method and path, MCP tools, refusals, re-auths, refreshes",
                     parent=audit, config=False)
    report.add_argument("files", nargs="*", metavar="FILE",
                        help="audit files, oldest first (rotated ones too, .gz allowed); "
                             "- or none: stdin")
    report.add_argument("--user", help="only this user (default: every user, grouped)")
    report.add_argument("--provider", help="only this provider")
    window_flags(report)
    report.add_argument("--format", choices=["table", "json", "csv"], default="table")
    report.add_argument("--depth", type=int, default=2,
                        help="path segments kept after the host (default 2)")
    report.add_argument("--verify", action="store_true",
                        help="also check the hash chain in the same read, as `audit verify` "
                             "with the same window does (result on stderr; exit 1 if broken)")
    report.add_argument("--allow-partial", action="store_true",
                        help="with --verify: accept chains that start mid-way")
    verify.add_argument("--any-order", action="store_true",
                        help="records in any order (what a SIEM search gives back: newest "
                             "first, by ingestion): put in chain order first (holds them "
                             "all in memory); without it, reordered records are a break")
    verify.add_argument("--key", action="append", default=[], metavar="PUB.pem",
                        help="check signed checkpoints with this Ed25519 public key "
                             "(repeat for rotated keys); reports records after the last "
                             "checkpoint as unproven")
    verify.add_argument("--checkpoints", action="append", default=[], metavar="FILE",
                        help="the checkpoint sink's copies: the log must still hold every "
                             "record they state (detects deleting the newest records)")
    verify.add_argument("--require-proof", action="store_true",
                        help="exit 1 when records follow the last checkpoint")
    export = command("export", cmd_audit_export, "convert audit records to OCSF events "
                     "(JSON lines; the record is kept in unmapped.credproxy)", parent=audit,
                     config=False)
    export.add_argument("files", nargs="*", metavar="FILE",
                        help="audit files, oldest first (default: stdin)")
    export.add_argument("--format", choices=["ocsf"], default="ocsf")
    akg = command("keygen", cmd_audit_keygen, "write an Ed25519 checkpoint signing key",
                  parent=audit, config=False)
    akg.add_argument("--out", required=True, help="private key file to create (0600)")
    akg.add_argument("--public", help="also write the public key here (printed anyway)")

    context = sub.add_parser("context", help="development helpers for user contexts"
                             ).add_subparsers(metavar="CMD")
    kg = command("keygen", cmd_context_keygen, "write a development signing key pair",
                 parent=context, config=False)
    kg.add_argument("--out-dir", required=True)
    kg.add_argument("--alg", default="EdDSA", choices=["EdDSA", "ES256", "RS256"])
    mint_p = command("mint", cmd_context_mint, "sign a user-context token (development only)",
                     parent=context)
    mint_p.add_argument("--user", required=True, help="the sub claim")
    mint_p.add_argument("--key", help="private key file (JWK or PEM) from `context keygen`")
    mint_p.add_argument("--hs256-secret-env", help="env var holding an HS256 secret")
    mint_p.add_argument("--issuer")
    mint_p.add_argument("--audience")
    mint_p.add_argument("--ttl", type=int, default=300)
    mint_p.add_argument("--ctx-kind", default="chat")
    mint_p.add_argument("--ctx-id", default="dev")
    mint_p.add_argument("--providers", help="comma-separated provider ids the context may use")
    mint_p.add_argument("--jti", action="store_true", help="add a random jti")

    demo = command("demo", cmd_demo, "run the end-to-end demo on the embedded default",
                   config=False)
    demo.add_argument("--workdir", default=".credproxy-demo")
    demo.add_argument("--keep", action="store_true", help="keep the servers running")
    return p


if __name__ == "__main__":
    sys.exit(main())
