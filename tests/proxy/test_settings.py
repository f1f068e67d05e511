"""Configuration parsing and validation (proxy.settings): every error names its key."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.errors import ConfigError
from proxy.secret import Secret
from proxy.settings import (
    ProviderSettings,
    Settings,
    load_settings,
    parse_settings,
    resolve_secret,
    validate_host_pattern,
)

PROVIDER: dict[str, Any] = {
    "id": "docs",
    "hosts": ["docs.example.com"],
    "token_url": "https://login.example.com/token",
    "client_id": "client-1",
    "client_secret_env": "DOCS_CLIENT_SECRET",
}
MINIMAL: dict[str, Any] = {
    "identity": {"issuer": "https://platform.example.com", "audience": "credproxy",
                 "jwks_file": "/etc/credproxy/jwks.json"},
}


def config(*providers: dict[str, Any], **top: Any) -> dict[str, Any]:
    data = copy.deepcopy(MINIMAL)
    data["providers"] = [copy.deepcopy(p) for p in providers]
    data.update(top)
    return data


def provider(**overrides: Any) -> dict[str, Any]:
    p = copy.deepcopy(PROVIDER)
    for key, value in overrides.items():
        if value is None:
            p.pop(key, None)
        else:
            p[key] = value
    return p


def identity(**overrides: Any) -> dict[str, Any]:
    ident = copy.deepcopy(MINIMAL["identity"])
    for key, value in overrides.items():
        if value is None:
            ident.pop(key, None)
        else:
            ident[key] = value
    return ident


def test_minimal_config_gets_the_documented_defaults() -> None:
    s = parse_settings(copy.deepcopy(MINIMAL))
    assert isinstance(s, Settings)
    assert (s.listen, s.admin, s.unrouted, s.providers) == ("127.0.0.1:8080", "127.0.0.1:9090",
                                                            "passthrough", [])
    ident = s.identity
    assert ident.header == "X-User-Context"
    assert ident.algorithms == ["EdDSA", "ES256", "RS256"]
    assert (ident.typ, ident.max_lifetime, ident.leeway) == ("user-context+jwt", 900, 30)
    assert (ident.one_time_jti, ident.max_token_bytes) == (False, 8192)


def test_full_provider_is_normalised() -> None:
    s = parse_settings(config(provider(
        hosts=["  Docs.Example.COM. ", "*.API.example.com:8443", "[0::1]:9000", "10.0.0.1"],
        methods=["get", "Post"], scopes=["read"],
    )))
    p = s.providers[0]
    assert p.hosts == ["docs.example.com", "*.api.example.com:8443", "[::1]:9000", "10.0.0.1"]
    assert p.methods == ["GET", "POST"]
    assert p.inject.header == "Authorization" and p.inject.format == "Bearer {access_token}"


def test_connect_url_and_provider_lookup() -> None:
    s = parse_settings(config(provider(), provider(id="mail", hosts=["mail.example.com"],
                                                   connect_url="https://portal/mail"),
                              public_url="https://proxy.example.com/"))
    assert s.connect_url(s.provider("docs")) == "https://proxy.example.com/connect/docs"
    assert s.connect_url(s.provider("mail")) == "https://portal/mail"
    assert parse_settings(config(provider())).connect_base == "http://127.0.0.1:9090"
    with pytest.raises(ConfigError, match="no provider with id 'nope'"):
        s.provider("nope")


@pytest.mark.parametrize(("data", "match"), [
    pytest.param(config(bogus=1), r"^config: bogus: unknown key$", id="top-level"),
    pytest.param(config(provider(foo=1)), r"^config: providers\[0\]\.foo: unknown key$",
                 id="provider"),
    pytest.param(config(identity=identity(bar=1)), r"^config: identity\.bar: unknown key$",
                 id="identity"),
    pytest.param(config(provider(inject={"format": "Bearer {access_token}", "x": 1})),
                 r"^config: providers\[0\]\.inject\.x: unknown key$", id="inject"),
    pytest.param(config(provider(), provider(id="b", hosts=["b.example.com"], oops=True)),
                 r"^config: providers\[1\]\.oops: unknown key$", id="second-provider"),
    pytest.param(config(vault={"backend": "local", "pathh": "x"}),
                 r"^config: vault\.pathh: unknown key$", id="vault"),
])
def test_unknown_keys_are_named(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_settings(data)


BAD: list[Any] = [
    # top level
    pytest.param(config(listen="127.0.0.1"), "listen: must be HOST:PORT", id="listen-no-port"),
    pytest.param(config(listen=":8080"), "listen: must be HOST:PORT", id="listen-no-host"),
    pytest.param(config(admin="localhost:99999"), "admin: must be HOST:PORT",
                 id="admin-port-range"),
    pytest.param(config(listen="localhost:http"), "listen: must be HOST:PORT",
                 id="listen-port-name"),
    pytest.param(config(unrouted="allow"), "unrouted: Input should be", id="unrouted-value"),
    pytest.param({"providers": []}, "identity: Field required", id="identity-missing"),
    pytest.param(config(identity=None), "identity: Input should be a valid dictionary",
                 id="identity-null"),
    # identity
    pytest.param(config(identity=identity(algorithms=["none"])),
                 r"identity\.algorithms: 'none' is never allowed", id="alg-none"),
    pytest.param(config(identity=identity(algorithms=["EdDSA", "NONE"])),
                 r"identity\.algorithms: 'none' is never allowed", id="alg-NONE"),
    pytest.param(config(identity=identity(algorithms=[])),
                 r"identity\.algorithms: must list at least one", id="alg-empty"),
    pytest.param(config(identity=identity(algorithms=["ES256K"])),
                 r"identity\.algorithms: unsupported algorithm 'ES256K'", id="alg-unsupported"),
    pytest.param(config(identity=identity(algorithms=["RS256", "HS256"])),
                 r"identity: algorithms \['HS256'\] cannot be used with asymmetric keys",
                 id="hs256-with-jwks-file"),
    pytest.param(config(identity=identity(jwks_file=None, hs256_secret_env="S")),
                 r"identity: algorithms \['EdDSA', 'ES256', 'RS256'\] cannot be used with an "
                 r"HS256 secret", id="asymmetric-with-hs256-secret"),
    pytest.param(config(identity=identity(pem_file="/k.pem")),
                 "identity: set exactly one of", id="two-key-sources"),
    pytest.param(config(identity=identity(jwks_file=None)),
                 "identity: set exactly one of", id="no-key-source"),
    pytest.param(config(identity=identity(jwks_file=None, jwks_url="http://i/jwks")),
                 "identity: jwks_url must be https", id="jwks-url-http"),
    pytest.param(config(identity=identity(header="Authorization")),
                 r"identity\.header: must be a header name", id="header-authorization"),
    pytest.param(config(identity=identity(header="X User")),
                 r"identity\.header: must be a header name", id="header-space"),
    pytest.param(config(identity=identity(max_lifetime=0)), r"identity\.max_lifetime",
                 id="lifetime-zero"),
    pytest.param(config(identity=identity(leeway=301)), r"identity\.leeway", id="leeway-big"),
    pytest.param(config(identity=identity(max_token_bytes=100)),
                 r"identity\.max_token_bytes", id="token-bytes-small"),
    pytest.param(config(identity=identity(issuer=None)), r"identity\.issuer: Field required",
                 id="issuer-missing"),
    # providers
    pytest.param(config(provider(), provider()), r"duplicate provider ids: \['docs'\]",
                 id="duplicate-ids"),
    pytest.param(config(provider(), provider(id="b", hosts=["DOCS.example.com."])),
                 "host 'docs.example.com' is listed by providers 'docs' and 'b'",
                 id="duplicate-host-across-providers"),
    pytest.param(config(provider(id="Docs")), r"providers\[0\]\.id: String should match",
                 id="id-uppercase"),
    pytest.param(config(provider(hosts=[])), r"providers\[0\]\.hosts", id="hosts-empty"),
    pytest.param(config(provider(hosts=["ok.example.com", "*.com"])),
                 r"providers\[0\]\.hosts.*'\*\.com': a wildcard needs a suffix", id="host-*.com"),
    pytest.param(config(provider(hosts=["a..b"])), r"providers\[0\]\.hosts.*'a\.\.b'",
                 id="host-a..b"),
    pytest.param(config(provider(hosts=["host:99999"])), r"'host:99999': bad port",
                 id="host-port-range"),
    pytest.param(config(provider(hosts=["*"])), r"'\*': not a host name", id="host-*"),
    pytest.param(config(provider(inject={"format": "Bearer token"})),
                 r"providers\[0\]\.inject\.format: must contain \{access_token\}",
                 id="inject-format-without-token"),
    pytest.param(config(provider(inject={"format": "Bearer {token}"})),
                 r"providers\[0\]\.inject\.format: may use only", id="inject-format-unknown"),
    pytest.param(config(provider(inject={"format": "Bearer {}"})),
                 r"providers\[0\]\.inject\.format: may use only", id="inject-format-positional"),
    pytest.param(config(provider(inject={"header": "x-user-context"})),
                 r"inject\.header 'x-user-context' is the user-context header",
                 id="inject-into-the-context-header"),
    pytest.param(config(provider(inject={"header": "Proxy_Authorization"})),
                 r"is the user-context header or Proxy-Authorization",
                 id="inject-into-proxy-authorization-lookalike"),
    pytest.param(config(provider(methods=["GET/1"])), r"'GET/1' is not an HTTP method",
                 id="method-with-separator"),
    pytest.param(config(provider(methods=[""])), r"'' is not an HTTP method",
                 id="method-empty"),
    pytest.param(config(provider(methods=["g et"])), r"'g et' is not an HTTP method",
                 id="method-inner-space"),
    pytest.param(config(provider(inject={"format": "Bearer {access_token"})),
                 r"providers\[0\]\.inject\.format: may use only", id="inject-format-unclosed"),
    pytest.param(config(provider(token_url="http://login.example.com/token")),
                 r"providers\[0\]: token_url must be an https URL", id="token-url-http"),
    pytest.param(config(provider(authorize_url="ftp://login.example.com/auth")),
                 r"providers\[0\]: authorize_url must be an https URL", id="authorize-url-ftp"),
    pytest.param(config(provider(client_secret_env=None)),
                 r"providers\[0\]: client_secret_env or client_secret_file is required",
                 id="client-secret-missing"),
    pytest.param(config(provider(client_secret_file="/s")),
                 r"providers\[0\]: set only one of client_secret_env, client_secret_file",
                 id="client-secret-both"),
    pytest.param(config(provider(token_endpoint_auth_method="private_key_jwt")),
                 r"providers\[0\]\.token_endpoint_auth_method", id="auth-method"),
    pytest.param(config(provider(refresh_skew=-1)), r"providers\[0\]\.refresh_skew",
                 id="refresh-skew-negative"),
    # other sections
    pytest.param(config(vault={"backend": "azure"}),
                 "vault: backend 'azure' needs url", id="vault-azure"),
    pytest.param(config(coordination={"backend": "redis"}),
                 "coordination: redis needs exactly one of url, url_env", id="redis-no-url"),
    pytest.param(config(coordination={"backend": "redis", "url": "redis://u:pw@h:6379/0"}),
                 "coordination: url must not contain a password", id="redis-url-password"),
    pytest.param(config(coordination={"backend": "redis", "url": "http://h"}),
                 "coordination: url must start with redis://", id="redis-url-scheme"),
    # Redis topologies (issue 18)
    pytest.param(config(coordination={"backend": "redis", "mode": "sentinel"}),
                 "coordination: mode sentinel needs sentinels", id="sentinel-empty"),
    pytest.param(config(coordination={"backend": "redis", "mode": "sentinel",
                                      "sentinels": ["s1:26379"]}),
                 "coordination: mode sentinel needs sentinels .* and service_name",
                 id="sentinel-no-service"),
    pytest.param(config(coordination={"backend": "redis", "mode": "sentinel",
                                      "sentinels": ["s1:26379"], "service_name": "m",
                                      "url": "redis://h:6379"}),
                 "coordination: mode sentinel takes sentinels and service_name, not url",
                 id="sentinel-with-url"),
    pytest.param(config(coordination={"backend": "redis", "mode": "sentinel",
                                      "sentinels": ["s1"], "service_name": "m"}),
                 r"coordination\.sentinels\[0\]: must be HOST:PORT", id="sentinel-no-port"),
    pytest.param(config(coordination={"backend": "redis", "url": "redis://h:6379",
                                      "sentinels": ["s1:26379"]}),
                 "coordination: sentinels, service_name, sentinel_username, "
                 "sentinel_password_env are for mode sentinel",
                 id="sentinels-outside-sentinel-mode"),
    pytest.param(config(coordination={"backend": "redis", "url": "redis://h:6379",
                                      "nodes": ["n2:6379"]}),
                 "coordination: nodes is for mode cluster", id="nodes-outside-cluster"),
    pytest.param(config(coordination={"backend": "redis", "mode": "cluster",
                                      "url": "redis://h:6379/2"}),
                 "coordination: a Redis Cluster has database 0 only", id="cluster-db"),
    pytest.param(config(coordination={"backend": "redis", "mode": "shards",
                                      "url": "redis://h:6379"}),
                 r"coordination\.mode", id="mode-unknown"),
    pytest.param(config(coordination={"backend": "redis", "url": "redis://h:6379",
                                      "replica_acks": 9}),
                 r"coordination\.replica_acks", id="replica-acks-too-many"),
    pytest.param(config(coordination={"backend": "redis", "url": "redis://h:6379",
                                      "entra_id": {}, "password_env": "P"}),
                 "coordination: entra_id replaces username and password", id="entra-and-pw"),
    pytest.param(config(coordination={"backend": "redis", "url": "redis://h:6379",
                                      "entra_id": {"credential": "file"}}),
                 r"coordination\.entra_id: credential: file needs token_file",
                 id="entra-file-without-file"),
    pytest.param(config(coordination={"backend": "redis", "url": "redis://h:6379",
                                      "entra_id": {"token_file": "/t"}}),
                 r"coordination\.entra_id: credential: file needs token_file",
                 id="entra-file-with-default"),
    pytest.param(config(coordination={"backend": "redis", "url": "redis://h:6379/0",
                                      "sentinel_username": "app"}),
                 "coordination: sentinels, service_name, sentinel_username",
                 id="sentinel-user-standalone"),
    pytest.param(config(coordination={"backend": "redis", "mode": "sentinel",
                                      "sentinels": ["h:26379"], "service_name": "m",
                                      "sentinel_username": "app"}),
                 "coordination: sentinel_username needs sentinel_password_env",
                 id="sentinel-user-no-password"),
    pytest.param(config(refresh={"attempts": 0}), r"refresh\.attempts", id="refresh-attempts"),
    pytest.param(config(stream_large_bodies="lots"), "stream_large_bodies: must be a size",
                 id="size-word"),
    pytest.param(config(stream_large_bodies="1M"), "stream_large_bodies:", id="size-upper"),
    pytest.param(config(stream_large_bodies="1.5m"), "stream_large_bodies:", id="size-fraction"),
    pytest.param(config(stream_large_bodies=""), "stream_large_bodies:", id="size-empty"),
    pytest.param(config(public_url="not a url"), "public_url: must be an absolute",
                 id="public-url-words"),
    pytest.param(config(public_url="credproxy.example.com"), "public_url:",
                 id="public-url-no-scheme"),
    pytest.param(config(public_url="https://"), "public_url:", id="public-url-no-host"),
    pytest.param(config(public_url="https://a.example.com:99999"), "public_url:",
                 id="public-url-bad-port"),
    pytest.param(config(public_url="https://u@a.example.com"), "public_url:",
                 id="public-url-userinfo"),
    pytest.param(config(public_url="https://a.example.com/#x"), "public_url:",
                 id="public-url-fragment"),
    pytest.param(config(reload={"settle": 61}), r"reload\.settle", id="settle-too-long"),
    pytest.param(config(reload={"allow_provider_removal": "docs"}),
                 r"reload\.allow_provider_removal", id="removal-not-a-list"),
    pytest.param(config(reload={"allow": ["docs"]}), r"reload\.allow: unknown key",
                 id="reload-unknown-key"),
]


@pytest.mark.parametrize("value", ["0", "1", "1024", "1b", "64k", "1m", "2g", "1t"])
def test_stream_large_bodies_takes_mitmproxys_sizes(value: str) -> None:
    assert parse_settings(config(stream_large_bodies=value)).stream_large_bodies == value


@pytest.mark.parametrize("url", ["https://credproxy.example.com",
                                 "http://127.0.0.1:9090", "https://x.example.com/base/"])
def test_public_url_accepts_absolute_http_urls(url: str) -> None:
    assert parse_settings(config(public_url=url)).public_url == url


def test_reload_defaults() -> None:
    r = parse_settings(config()).reload
    assert r.allow_provider_removal == [] and r.settle == 2.0


@pytest.mark.parametrize(("data", "match"), BAD)
def test_bad_values_are_config_errors_naming_the_key(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_settings(data, source="credproxy.yaml")


def test_error_names_the_source_and_every_problem() -> None:
    data = config(provider(foo=1), listen="nope")
    with pytest.raises(ConfigError) as info:
        parse_settings(data, source="/etc/credproxy.yaml")
    message = str(info.value)
    assert message.startswith("/etc/credproxy.yaml: ")
    assert "listen: must be HOST:PORT" in message and "providers[0].foo: unknown key" in message


@pytest.mark.parametrize("data", [None, [], "identity: x", 42],
                         ids=["null", "list", "string", "int"])
def test_top_level_must_be_a_mapping(data: Any) -> None:
    with pytest.raises(ConfigError, match="config: the top level must be a mapping"):
        parse_settings(data)


def test_bad_host_error_names_the_list_index() -> None:
    with pytest.raises(ConfigError, match=r"providers\[0\]\.hosts\[1\]: "):
        parse_settings(config(provider(hosts=["ok.example.com", "a..b"])))


@pytest.mark.parametrize(("first", "second"), [
    pytest.param("api.example.com:0443", "api.example.com:443", id="port-leading-zero"),
    pytest.param("api.example.com", "api.example.com:443", id="implicit-vs-explicit-443"),
])
def test_overlapping_hosts_across_providers_are_rejected(first: str, second: str) -> None:
    with pytest.raises(ConfigError, match="is listed by providers"):
        parse_settings(config(provider(hosts=[first]),
                              provider(id="other", hosts=[second])))


@pytest.mark.parametrize("key", ["issuer", "audience"])
def test_identity_issuer_and_audience_must_not_be_empty(key: str) -> None:
    with pytest.raises(ConfigError, match=rf"identity\.{key}"):
        parse_settings(config(identity=identity(**{key: "  "})))


def test_inject_format_with_escaped_braces_is_rejected() -> None:
    with pytest.raises(ConfigError, match=r"inject\.format"):
        parse_settings(config(provider(inject={"format": "Bearer {{access_token}}"})))


def test_inject_format_may_use_token_type() -> None:
    s = parse_settings(config(provider(inject={"header": "X-Api-Key",
                                               "format": "{token_type} {access_token}"})))
    assert s.providers[0].inject.format == "{token_type} {access_token}"


def test_public_client_needs_no_secret_and_http_needs_allow_http() -> None:
    p = ProviderSettings(**provider(client_secret_env=None, token_endpoint_auth_method="none",
                                    token_url="http://127.0.0.1:5000/token", allow_http=True))
    assert p.token_url.startswith("http://")


# --- host patterns --------------------------------------------------------------------------


@pytest.mark.parametrize(("pattern", "expected"), [
    pytest.param("api.example.com", "api.example.com", id="plain"),
    pytest.param(" API.Example.COM ", "api.example.com", id="case-and-space"),
    pytest.param("api.example.com.", "api.example.com", id="trailing-dot"),
    pytest.param("api.example.com:8443", "api.example.com:8443", id="port"),
    pytest.param("*.example.com", "*.example.com", id="wildcard"),
    pytest.param("*.EU.example.com:8443", "*.eu.example.com:8443", id="wildcard-port"),
    pytest.param("10.0.0.1", "10.0.0.1", id="ipv4"),
    pytest.param("10.0.0.1:8080", "10.0.0.1:8080", id="ipv4-port"),
    pytest.param("[0:0::1]", "[::1]", id="ipv6"),
    pytest.param("[::1]:8443", "[::1]:8443", id="ipv6-port"),
    pytest.param("::1", "[::1]", id="ipv6-unbracketed"),
    pytest.param("localhost", "localhost", id="single-label"),
    pytest.param("xn--bcher-kva.de", "xn--bcher-kva.de", id="punycode"),
])
def test_validate_host_pattern_accepts(pattern: str, expected: str) -> None:
    assert validate_host_pattern(pattern) == expected


@pytest.mark.parametrize(("pattern", "match"), [
    pytest.param("*.com", "a wildcard needs a suffix of two labels", id="wildcard-tld"),
    pytest.param("*", "not a host name", id="star"),
    pytest.param("*.*.example.com", "not a host name", id="double-wildcard"),
    pytest.param("api.*.example.com", "not a host name", id="inner-wildcard"),
    pytest.param("a..b", "not a host name", id="empty-label"),
    pytest.param(".example.com", "not a host name", id="leading-dot"),
    pytest.param("example.com..", "not a host name", id="two-trailing-dots"),
    pytest.param("", "not a host name", id="empty"),
    pytest.param("-a.example.com", "not a host name", id="label-leading-hyphen"),
    pytest.param("a-.example.com", "not a host name", id="label-trailing-hyphen"),
    pytest.param("a" * 64 + ".com", "not a host name", id="label-too-long"),
    pytest.param("under_score.com", "not a host name", id="underscore"),
    pytest.param("user@example.com", "not a host name", id="userinfo"),
    pytest.param("https://example.com", "bad port", id="url"),
    pytest.param("example.com/path", "not a host name", id="path"),
    pytest.param("bücher.de", "not a host name", id="unicode"),
    pytest.param("host:99999", "bad port", id="port-too-big"),
    pytest.param("host:0", "bad port", id="port-zero"),
    pytest.param("host:", "bad port", id="port-empty"),
    pytest.param("host:https", "bad port", id="port-name"),
    pytest.param("[::1]:x", "bad port", id="ipv6-bad-port"),
    pytest.param("[::1", "bad port", id="ipv6-unterminated"),
    pytest.param(
        "host:٤٤٣", "bad port", id="port-non-ascii-digits"),
])
def test_validate_host_pattern_rejects(pattern: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_host_pattern(pattern)


# --- secrets --------------------------------------------------------------------------------


def test_resolve_secret_from_env() -> None:
    secret = resolve_secret(env="DOCS_SECRET", file=None, what="providers.docs.client_secret",
                            environ={"DOCS_SECRET": "s3cr3t-value"})
    assert isinstance(secret, Secret) and secret.reveal() == "s3cr3t-value"


def test_resolve_secret_from_file_is_stripped(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("  s3cr3t-value\n")
    assert resolve_secret(env=None, file=str(path), what="x", environ={}).reveal() == (
        "s3cr3t-value")


def test_resolve_secret_env_wins_over_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_text("from-file")
    secret = resolve_secret(env="S", file=str(path), what="x", environ={"S": "from-env"})
    assert secret.reveal() == "from-env"


@pytest.mark.parametrize(("env", "file", "environ", "match"), [
    pytest.param("DOCS_SECRET", None, {}, r"^what: environment variable DOCS_SECRET is not set$",
                 id="env-unset"),
    pytest.param("DOCS_SECRET", None, {"DOCS_SECRET": ""},
                 r"^what: environment variable DOCS_SECRET is not set$", id="env-empty"),
    pytest.param(None, "{dir}/missing", {}, r"^what: cannot read .*missing: No such file",
                 id="file-missing"),
    pytest.param(None, "{dir}/empty", {}, r"^what: .*empty is empty$", id="file-empty"),
    pytest.param(None, "{dir}", {}, r"^what: cannot read ", id="file-is-directory"),
    pytest.param(None, None, {"OTHER": "s3cr3t-value"}, r"^what: no secret configured$",
                 id="nothing-configured"),
])
def test_resolve_secret_errors(env: str | None, file: str | None, environ: dict[str, str],
                               match: str, tmp_path: Path) -> None:
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ConfigError, match=match) as info:
        resolve_secret(env=env, file=file.format(dir=tmp_path) if file else None, what="what",
                       environ=environ)
    assert "s3cr3t-value" not in str(info.value)


def test_resolve_secret_undecodable_file(tmp_path: Path) -> None:
    path = tmp_path / "secret"
    path.write_bytes(b"\xffs3cr3t")
    with pytest.raises(ConfigError, match="what: .* is not UTF-8 text"):
        resolve_secret(env=None, file=str(path), what="what", environ={})


# --- loading --------------------------------------------------------------------------------


def test_load_settings_reads_yaml(tmp_path: Path) -> None:
    path = tmp_path / "credproxy.yaml"
    path.write_text(
        "identity:\n  issuer: https://platform.example.com\n  audience: credproxy\n"
        "  jwks_file: /etc/jwks.json\nproviders:\n  - id: docs\n    hosts: [docs.example.com]\n"
        "    token_url: https://login.example.com/token\n    client_id: c\n"
        "    client_secret_env: DOCS_SECRET\n"
    )
    s = load_settings(path)
    assert s.providers[0].hosts == ["docs.example.com"]


LoadCase = Callable[[Path], Path]


@pytest.mark.parametrize(("write", "match"), [
    pytest.param(lambda d: d / "missing.yaml", r"cannot read config file .*missing\.yaml: No such",
                 id="missing"),
    pytest.param(lambda d: d, r"cannot read config file", id="directory"),
    pytest.param(lambda d: _write(d, "identity: [unclosed\n"), r"c\.yaml: not valid YAML",
                 id="invalid-yaml"),
    pytest.param(lambda d: _write(d, "a: 1\n\tb: 2\n"), r"c\.yaml: not valid YAML", id="tab"),
    pytest.param(lambda d: _write(d, ""), r"c\.yaml: the top level must be a mapping",
                 id="empty"),
    pytest.param(lambda d: _write(d, "- 1\n- 2\n"), r"c\.yaml: the top level must be a mapping",
                 id="list"),
    pytest.param(lambda d: _write(d, "identity: {issuer: i, audience: a, jwks_file: j}\nx: 1\n"),
                 r"c\.yaml: x: unknown key", id="unknown-key"),
    pytest.param(
        lambda d: _write(d, b"identity: \xff\n"), r"c\.yaml", id="not-utf8"),
    pytest.param(lambda d: _write(d, "listen: a:1\nadmin: null\nlisten: b:2\n"),
                 r"c\.yaml: not valid YAML: line 3: duplicate key 'listen' \(first given on "
                 r"line 1\)$", id="duplicate-top-level-key"),
    pytest.param(lambda d: _write(d, "identity:\n  issuer: a\n  audience: b\n  issuer: c\n"),
                 r"line 4: duplicate key 'issuer' \(first given on line 2\)",
                 id="duplicate-nested-key"),
    pytest.param(lambda d: _write(d, "providers:\n  - id: a\n    id: b\n"),
                 r"line 3: duplicate key 'id'", id="duplicate-key-in-a-list-item"),
    pytest.param(lambda d: _write(d, "a: &x {k: 1}\nb: {<<: *x, j: 2}\nb: 3\n"),
                 r"line 3: duplicate key 'b'", id="duplicate-after-merge"),
])
def test_load_settings_errors(write: LoadCase, match: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=match):
        load_settings(write(tmp_path))


def _write(directory: Path, content: str | bytes) -> Path:
    path = directory / "c.yaml"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    return path


@pytest.mark.parametrize("url", [
    "https://app.example.com/done",
    "http://127.0.0.1:8000/cb",
    "http://127.9.9.9/cb",
    "http://localhost:3000/",
    "http://[::1]:8080/cb",
])
def test_return_urls_accepted(url: str) -> None:
    assert parse_settings(config(connect={"return_urls": [url]})).connect.return_urls == [url]


@pytest.mark.parametrize("url", [
    pytest.param("http://127.0.0.1.evil.example/cb", id="loopback-lookalike-host"),
    pytest.param("http://localhost.evil.example/cb", id="localhost-lookalike-host"),
    pytest.param("http://127.0.0.1@evil.example/cb", id="userinfo-loopback"),
    pytest.param("https://app.example.com@evil.example/", id="userinfo-https"),
    pytest.param("http://app.example.com/done", id="plain-http-remote"),
    pytest.param("javascript:alert(1)//127.0.0.1", id="javascript"),
    pytest.param("//app.example.com/done", id="scheme-relative"),
    pytest.param("https:///done", id="no-host"),
    pytest.param("https://app.example.com:99999/", id="bad-port"),
    pytest.param("https://app.example.com/done#frag", id="fragment"),
    pytest.param("https://app.example.com\\@evil.example/", id="backslash"),
])
def test_return_urls_rejected(url: str) -> None:
    with pytest.raises(ConfigError, match="connect.return_urls"):
        parse_settings(config(connect={"return_urls": [url]}))


@pytest.mark.parametrize("candidate,allowed", [
    ("https://app.example.com/done", True),
    ("https://APP.example.com:443/done", True),
    ("https://app.example.com/done?tab=connections", True),
    ("https://app.example.com/done/docs", True),
    ("http://127.0.0.1:8000/cb", True),
    ("https://app.example.com.evil.example/done", False),
    ("https://app.example.com:8443/done", False),
    ("http://app.example.com/done", False),
    ("https://app.example.com/done-evil", False),
    ("https://app.example.com/", False),
    ("https://app.example.com/done/../admin", False),
    ("https://app.example.com/done/%2e%2e/admin", False),
    ("https://app.example.com/done/%2fevil", False),
    ("https://app.example.com@evil.example/done", False),
    ("https://evil.example/?https://app.example.com/done", False),
    ("http://127.0.0.1.evil.example:8000/cb", False),
    ("http://127.0.0.1:8001/cb", False),
    ("//app.example.com/done", False),
    ("https://app.example.com/done#x", False),
])
def test_return_to_is_compared_parsed(candidate: str, allowed: bool) -> None:
    s = parse_settings(config(connect={"return_urls": ["https://app.example.com/done",
                                                       "http://127.0.0.1:8000/cb"]}))
    assert s.connect.allows_return(candidate) is allowed



@pytest.mark.parametrize(("coordination", "slotted", "acks"), [
    pytest.param({"url": "redis://h:6379/0"}, False, 0, id="standalone"),
    pytest.param({"mode": "cluster", "url": "rediss://h:10000", "nodes": ["h2:10000"]},
                 True, 1, id="cluster"),
    pytest.param({"mode": "sentinel", "sentinels": ["s1:26379", "[::1]:26379"],
                  "service_name": "credproxy"}, False, 1, id="sentinel"),
    pytest.param({"url": "rediss://h:10000", "slot_safe_keys": True, "entra_id": {}},
                 True, 0, id="enterprise-policy-entra"),
    pytest.param({"mode": "cluster", "url": "redis://h:6379", "replica_acks": 0}, True, 0,
                 id="cluster-without-acks"),
])
def test_redis_topologies(coordination: dict[str, Any], slotted: bool, acks: int) -> None:
    """Each topology validates, with its key layout and replica confirmations by mode."""
    c = parse_settings(config(coordination={"backend": "redis", **coordination})).coordination
    assert (c.slotted, c.acks) == (slotted, acks)


# -- mcp: <server URL> (issue 15) ------------------------------------------------------------

def test_mcp_entry_needs_only_the_server_url() -> None:
    s = parse_settings(config({"id": "linear", "mcp": "https://MCP.Linear.example/mcp"}))
    p = s.providers[0]
    assert p.hosts == ["mcp.linear.example"]
    assert p.mcp_resource == "https://mcp.linear.example/mcp"
    assert (p.token_url, p.authorize_url, p.client_id) == ("", None, "")


def test_mcp_entry_host_keeps_a_non_default_port_and_plain_http_needs_allow_http() -> None:
    s = parse_settings(config({"id": "local", "mcp": "http://127.0.0.1:8123/mcp",
                               "allow_http": True}))
    assert s.providers[0].hosts == ["127.0.0.1:8123"]
    with pytest.raises(ConfigError, match="mcp must be an https URL"):
        parse_settings(config({"id": "local", "mcp": "http://127.0.0.1:8123/mcp"}))


def test_mcp_entry_with_a_pre_registered_client() -> None:
    s = parse_settings(config({"id": "gh", "mcp": "https://mcp.gh.example/", "client_id": "c1",
                               "client_secret_env": "GH_SECRET",
                               "issuer": "https://login.gh.example"}))
    assert s.providers[0].client_id == "c1"
    with pytest.raises(ConfigError, match="client_secret_env or client_secret_file is required"):
        parse_settings(config({"id": "gh", "mcp": "https://mcp.gh.example/",
                               "client_id": "c1"}))


@pytest.mark.parametrize(("extra", "match"), [
    pytest.param({"mcp": "https://a.example/mcp#top"}, "without a fragment", id="fragment"),
    pytest.param({"mcp": "https://u:p@a.example/mcp"}, "user info", id="userinfo"),
    pytest.param({"mcp": "/mcp"}, "https URL", id="relative"),
    pytest.param({"mcp": "https://a.example/mcp", "token_url": "https://a.example/t"},
                 "token_url: not set with mcp", id="token-url"),
    pytest.param({"mcp": "https://a.example/mcp", "authorize_url": "https://a.example/a"},
                 "authorize_url: not set with mcp", id="authorize-url"),
    pytest.param({"mcp": "https://a.example/mcp", "hosts": ["b.example"]},
                 "host 'a.example' is not one of hosts", id="host-outside"),
    pytest.param({"mcp": "https://a.example/mcp", "client_secret_env": "X"},
                 "needs the pre-registered client_id", id="secret-without-client"),
])
def test_mcp_entry_errors(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_settings(config({"id": "m", **extra}))


@pytest.mark.parametrize("missing", ["token_url", "client_id"])
def test_entry_without_mcp_still_needs_its_endpoints(missing: str) -> None:
    with pytest.raises(ConfigError, match=f"{missing} is required"):
        parse_settings(config(provider(**{missing: None})))
