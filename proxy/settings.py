"""Configuration: the YAML file users write, validated into typed settings.

Unknown keys and bad values are :class:`proxy.errors.ConfigError` naming the key
(``providers[0].hosts[1]: ...``). Secrets are never inline: ``*_env`` names an environment
variable, ``*_file`` a file; they are resolved by :func:`resolve_secret` when used.
"""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from proxy import binding
from proxy.binding import GrantValues, GrantValueSettings
from proxy.dialect import (
    RESERVED_AUTHORIZE_PARAMS,
    RESERVED_TOKEN_PARAMS,
    ApiSignals,
    Catalog,
    Revocation,
    TokenErrors,
    TokenResponse,
    expand_provider,
)
from proxy.errors import ConfigError
from proxy.headers import field_key
from proxy.hosts import HostPattern, canonical_uri, path_within
from proxy.secret import Secret

_SAFE_ALGS = {"EdDSA", "Ed25519", "ES256", "ES384", "ES512", "RS256", "RS384", "RS512", "PS256",
              "PS384", "PS512", "HS256", "HS384", "HS512"}
_SYMMETRIC_ALGS = {"HS256", "HS384", "HS512"}
# RFC 6749 section 3.3: scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
_SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _address(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError("must be HOST:PORT")
    return value


class IdentitySettings(_Model):
    header: str = "X-User-Context"
    issuer: Annotated[str, Field(min_length=1)]
    audience: Annotated[str, Field(min_length=1)]
    jwks_file: str | None = None
    jwks_url: str | None = None
    pem_file: str | None = None
    hs256_secret_env: str | None = None
    hs256_secret_file: str | None = None
    algorithms: list[str] = Field(default_factory=lambda: ["EdDSA", "ES256", "RS256"])
    typ: Annotated[str, Field(min_length=1)] | None = "user-context+jwt"  # null: any typ
    max_lifetime: Annotated[int, Field(gt=0, le=86400)] = 900
    leeway: Annotated[int, Field(ge=0, le=300)] = 30
    one_time_jti: bool = False  # require a jti and accept each token once
    max_token_bytes: Annotated[int, Field(ge=256, le=65536)] = 8192

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9-]+", v) or v.lower() in {"authorization", "host"}:
            raise ValueError("must be a header name other than Authorization/Host")
        return v

    @field_validator("algorithms")
    @classmethod
    def _algorithms(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("must list at least one algorithm")
        for alg in v:
            if alg.lower() == "none":
                raise ValueError("'none' is never allowed")
            if alg not in _SAFE_ALGS:
                raise ValueError(f"unsupported algorithm {alg!r}")
        return v

    @model_validator(mode="after")
    def _one_key_source(self) -> Self:
        sources = [s for s in ("jwks_file", "jwks_url", "pem_file", "hs256_secret_env",
                               "hs256_secret_file") if getattr(self, s)]
        if len(sources) != 1:
            raise ValueError("set exactly one of jwks_file, jwks_url, pem_file, "
                             "hs256_secret_env, hs256_secret_file")
        symmetric = sources[0].startswith("hs256")
        # Mixing key kinds enables algorithm-confusion attacks (RFC 8725 section 2.1).
        wrong = [a for a in self.algorithms if (a in _SYMMETRIC_ALGS) != symmetric]
        if wrong:
            kind = "an HS256 secret" if symmetric else "asymmetric keys"
            raise ValueError(f"algorithms {wrong} cannot be used with {kind}")
        if self.jwks_url and not self.jwks_url.startswith("https://"):
            raise ValueError("jwks_url must be https")
        return self


class VaultSettings(_Model):
    backend: Literal["local", "azure"] = "local"
    path: str = "~/.credproxy/vault.db"  # local
    # local: create the file when it does not exist. Only for a vault that is meant to start
    # empty whenever its volume is new (a per-pod emptyDir); otherwise a deleted vault would
    # silently come back empty. An existing empty or damaged file is an error either way.
    # Without it the first vault is made by `credproxy vault init`.
    create: bool = False
    # The vault key: encrypts the local vault; for every backend, other keys derive from it
    # (audit fingerprints, shared-cache encryption, Key Vault secret names).
    key_env: str | None = "CREDPROXY_VAULT_KEY"
    key_file: str | None = None
    url: str | None = None  # azure: https://<name>.vault.azure.net
    purge_on_delete: bool = False  # azure: purge revoked secrets (refused under purge protection)
    # One vault call's bound. azure: every try (at most 3) and wait included; local: the
    # longest wait for another process's write lock on the file.
    timeout: Annotated[float, Field(gt=0, le=120)] = 10.0
    ca_file: str | None = None  # azure: extra CA bundle (private endpoints, tests)
    # azure: a file holding a bearer token for Key Vault, re-read on every use, instead of
    # DefaultAzureCredential (for tests and externally provisioned tokens).
    token_file: str | None = None
    # azure: check that the 401 challenge's resource matches the vault's domain (keep on).
    verify_challenge_resource: bool = True
    api_version: str = "2025-07-01"  # azure: the Key Vault REST API version (pinned)
    poll_interval: Annotated[float, Field(gt=0, le=60)] = 2.0  # azure: delete/recover polls

    @model_validator(mode="after")
    def _backend(self) -> Self:
        if self.backend == "azure" and (not self.url or not self.url.startswith("https://")):
            raise ValueError("backend 'azure' needs url: https://<name>.vault.azure.net")
        return self


class EntraIdSettings(_Model):
    """Microsoft Entra ID authentication to Redis (Azure Managed Redis, Azure Cache for
    Redis): an access token for ``scope`` is the password, the token's ``oid`` claim the
    user; tokens are renewed before expiry and existing connections re-authenticated
    (redis-entraid's credential provider), never reconnected."""

    # Where tokens come from: DefaultAzureCredential (workload identity on Kubernetes,
    # managed identity, environment), or a file holding a token, re-read on every renewal
    # (tokens provisioned by something else; tests).
    credential: Literal["default", "file"] = "default"
    token_file: str | None = None
    # https://learn.microsoft.com/azure/redis/entra-for-authentication ("the scope
    # https://redis.azure.com/.default")
    scope: str = "https://redis.azure.com/.default"
    # Renew when this share of the token's lifetime has passed (redis-entraid's default).
    refresh_ratio: Annotated[float, Field(gt=0.1, lt=1.0)] = 0.7

    @model_validator(mode="after")
    def _source(self) -> Self:
        if (self.credential == "file") != bool(self.token_file):
            raise ValueError("credential: file needs token_file (and only it takes one)")
        return self


class CoordinationSettings(_Model):
    backend: Literal["memory", "redis"] = "memory"
    # Redis topology (docs, "Many replicas"): one server (or a proxy such as Azure Managed
    # Redis with the Enterprise cluster policy); a Redis Cluster (the OSS cluster policy:
    # url names any node, nodes lists more to start from); or Sentinel-managed replication.
    mode: Literal["standalone", "cluster", "sentinel"] = "standalone"
    url: str | None = None  # redis://host:6379/0 or rediss:// (TLS); never with a password
    url_env: str | None = None  # or the whole URL (which may hold a password) from the env
    nodes: list[Annotated[str, AfterValidator(_address)]] = Field(default_factory=list)
    sentinels: list[Annotated[str, AfterValidator(_address)]] = Field(default_factory=list)
    service_name: str | None = None  # sentinel: the monitored primary's name
    sentinel_password_env: str | None = None  # sentinel: when the sentinels require AUTH
    sentinel_username: str | None = None  # sentinel: their ACL user (else the default user)
    tls: bool = False  # sentinel: TLS to the sentinels and the servers (cluster: rediss://)
    username: str | None = None  # Redis ACL user
    password_env: str | None = None
    password_file: str | None = None
    entra_id: EntraIdSettings | None = None  # instead of a password
    ca_file: str | None = None  # CA bundle for rediss://
    key_prefix: str = "credproxy:"
    lock_lease: Annotated[float, Field(ge=1, le=300)] = 15.0  # renewed while held
    lock_wait: Annotated[float, Field(gt=0, le=300)] = 30.0  # max wait for another's refresh
    op_timeout: Annotated[float, Field(gt=0, le=30)] = 1.0  # per Redis command
    shared_cache: bool = True  # encrypted access-token cache shared by replicas
    # Replicas that must confirm a refresh lock (Redis WAIT) before the refresh runs, so a
    # replica promoted after its primary died still holds it. None: 1 for cluster and
    # sentinel, 0 for standalone. 0 turns the check off (a server without replicas, or
    # a proxy that refuses WAIT).
    replica_acks: Annotated[int, Field(ge=0, le=5)] | None = None
    # Keys of one grant (and every key a script touches) in one hash slot, with fencing
    # per slot. None: on for mode cluster, off otherwise. Turn it on for a proxy that
    # enforces the cluster's rules (Azure Managed Redis with the Enterprise cluster
    # policy). Off keeps the key names of earlier versions (a rolling update stays safe).
    slot_safe_keys: bool | None = None

    @model_validator(mode="after")
    def _backend(self) -> Self:
        if self.backend != "redis":
            return self
        if self.mode == "sentinel":
            if not self.sentinels or not self.service_name:
                raise ValueError("mode sentinel needs sentinels (HOST:PORT, ...) and "
                                 "service_name")
            if self.url or self.url_env or self.nodes:
                raise ValueError("mode sentinel takes sentinels and service_name, not url, "
                                 "url_env or nodes")
            if self.sentinel_username and not self.sentinel_password_env:
                raise ValueError("sentinel_username needs sentinel_password_env")
        else:
            if bool(self.url) == bool(self.url_env):
                raise ValueError("redis needs exactly one of url, url_env")
            if (self.sentinels or self.service_name or self.sentinel_password_env
                    or self.sentinel_username):
                raise ValueError("sentinels, service_name, sentinel_username, "
                                 "sentinel_password_env are for mode sentinel")
            if self.nodes and self.mode != "cluster":
                raise ValueError("nodes is for mode cluster")
        if self.url:
            if not self.url.startswith(("redis://", "rediss://")):
                raise ValueError("url must start with redis:// or rediss://")
            userinfo = self.url.split("://", 1)[1].split("/", 1)[0].rpartition("@")[0]
            if ":" in userinfo:
                raise ValueError("url must not contain a password: use password_env, "
                                 "password_file or url_env")
            if self.mode == "cluster" and self.url.split("://", 1)[1].partition("/")[2] \
                    not in ("", "0"):
                raise ValueError("a Redis Cluster has database 0 only: drop the /<db> of url")
        if self.password_env and self.password_file:
            raise ValueError("set only one of password_env, password_file")
        if self.entra_id is not None and (self.password_env or self.password_file
                                          or self.username):
            raise ValueError("entra_id replaces username and password: set only one")
        return self

    @property
    def slotted(self) -> bool:
        """Whether keys are laid out for hash slots (``slot_safe_keys``, by mode)."""
        return self.slot_safe_keys if self.slot_safe_keys is not None else (
            self.mode == "cluster")

    @property
    def acks(self) -> int:
        """The replicas that must confirm a refresh lock (``replica_acks``, by mode)."""
        if self.replica_acks is not None:
            return self.replica_acks
        return 0 if self.mode == "standalone" else 1


class CheckpointSettings(_Model):
    """Signed checkpoints of the audit chain (proxy.checkpoint)."""

    # An unencrypted PKCS#8 PEM Ed25519 private key (`credproxy audit keygen`): a mounted
    # Secret, or a Key Vault secret mounted by the Secrets Store CSI driver (Key Vault keys
    # cannot be Ed25519; docs/operations.md, "Signed checkpoints").
    key_file: str
    every_records: int | None = Field(default=1000, ge=1)
    every_seconds: float | None = Field(default=60.0, gt=0)
    # A second file that gets a copy of every checkpoint record (out of reach of whoever
    # can truncate the main log); `audit verify --checkpoints FILE` checks the log with it.
    sink: str | None = None


class OtlpSettings(_Model):
    """An OpenTelemetry logs export of the audit records (proxy.auditexport)."""

    endpoint: str  # the OTLP/HTTP logs URL, e.g. http://otel-collector:4318/v1/logs
    protocol: Literal["http/protobuf"] = "http/protobuf"
    # Request headers (an API key for a SaaS collector): header name -> env var holding it.
    headers_env: dict[str, str] = Field(default_factory=dict)
    timeout: float = Field(default=10.0, gt=0, le=120)  # one export call
    max_queue: int = Field(default=8192, ge=16)  # records waiting for export (then dropped)
    batch: int = Field(default=512, ge=1)
    delay: float = Field(default=1.0, gt=0, le=60)  # seconds between export batches
    ca_file: str | None = None  # an https endpoint's CA bundle

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str) -> str:
        if not re.fullmatch(r"https?://[^\s/?#]+(/[^\s?#]*)?", v):
            raise ValueError("must be an http(s) URL without query, e.g. "
                             "http://otel-collector:4318/v1/logs")
        return v


class ExportSettings(_Model):
    # raw: each log record's body is the audit record as written; ocsf: the OCSF event
    # (proxy.auditexport.to_ocsf), the record kept in unmapped.credproxy.
    format: Literal["raw", "ocsf"] = "raw"
    otlp: OtlpSettings | None = None


class AuditSettings(_Model):
    sink: str = "stdout"
    instance: str | None = None  # default: hostname + a random suffix per process
    # stdout only (see proxy.audit.StdoutSink): a write blocked this long refuses new
    # records; at most this many bytes wait for a slow reader; /healthz fails once stdout
    # has been unwritable this long (a restart is the only cure for a dead pipe).
    stall_timeout: float = Field(default=2.0, gt=0)
    buffer_bytes: int = Field(default=1 << 20, ge=4096)
    liveness_after: float = Field(default=30.0, gt=0)
    # file only: built-in size rotation (None: off, use logrotate); files kept besides it.
    rotate_bytes: int | None = Field(default=None, ge=4096)
    rotate_keep: int = Field(default=5, ge=1)
    checkpoint: CheckpointSettings | None = None
    export: ExportSettings = Field(default_factory=ExportSettings)


class InjectSettings(_Model):
    header: str = "Authorization"
    format: str = "Bearer {access_token}"

    @field_validator("format")
    @classmethod
    def _format(cls, v: str) -> str:
        marker = "\x00credproxy-token\x00"
        try:
            rendered = v.format(access_token=marker, token_type="Bearer")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError("may use only {access_token} and {token_type}") from exc
        if marker not in rendered:
            raise ValueError("must contain {access_token}")
        return v

    @field_validator("header")
    @classmethod
    def _header(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", v) or v.lower() in {
                "host", "proxy-authorization", "content-length", "transfer-encoding"}:
            raise ValueError("must be a header name other than Host/Proxy-Authorization/"
                             "Content-Length/Transfer-Encoding")
        return v


def _not_reserved(params: dict[str, str], reserved: frozenset[str]) -> dict[str, str]:
    """``params``, unless it sets a parameter credproxy sets itself (ValueError)."""
    taken = sorted(set(params) & reserved)
    if taken:
        raise ValueError(f"{taken} are set by credproxy and cannot be overridden")
    return params


_Hosts = Annotated[list[Annotated[str, AfterValidator(lambda h: validate_host_pattern(h))]],
                   Field(min_length=1)]
_Id = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]


class ResourceSettings(_Model):
    """Another audience sharing its provider's grant (one consent, one refresh token):
    Entra ID's SharePoint beside Graph. Its access token is obtained by redeeming the
    grant's refresh token with ``scopes`` (docs/tenants.md)."""

    hosts: _Hosts  # where this resource's requests go: the ceiling of its grant hosts
    grant_hosts: list[str] = Field(default_factory=list)  # templates over grant values
    scopes: Annotated[list[str], Field(min_length=1)]  # sent when redeeming for this resource
    inject: InjectSettings | None = None  # default: the provider's


class ProviderSettings(_Model):
    id: _Id
    hosts: _Hosts
    # An MCP server by its URL (MCP authorization spec, 2026-07-28): the authorization
    # server's endpoints come from discovery and the client from registration (proxy.mcpauth),
    # so token_url and authorize_url stay unset ("") and client_id is optional (a
    # pre-registered client); hosts default to the URL's host[:port].
    mcp: str | None = None
    authorize_url: str | None = None
    # The authorization server's issuer identifier (RFC 8414 section 2), where the provider
    # documents one: an ``iss`` in the authorization response must equal it (RFC 9207
    # section 2.4, mix-up defence); with ``iss_required`` a response without one is refused.
    issuer: str | None = None
    iss_required: bool = False
    token_url: str = ""  # required unless mcp
    revocation_url: str | None = None
    client_id: str = ""  # required unless mcp
    client_secret_env: str | None = None
    client_secret_file: str | None = None
    token_endpoint_auth_method: Literal["client_secret_basic", "client_secret_post", "none"] = (
        "client_secret_basic"
    )
    scopes: list[str] = Field(default_factory=list)  # the default a connect asks for
    # What a user may choose at connect (CLI --scope, the web page, a step-up's ?scope=);
    # null: ``scopes`` (a user may only narrow them). ``scopes`` must lie within it.
    scope_ceiling: list[str] | None = None
    # Scopes the agent's calls need: a grant the provider returns without one of them is
    # reported at connect (audit reason ``required_scope_not_granted``). Within the ceiling.
    required_scopes: list[str] = Field(default_factory=list)
    refresh_skew: Annotated[int, Field(ge=0, le=3600)] = 60
    inject: InjectSettings = Field(default_factory=InjectSettings)
    methods: list[str] | None = None  # allowlist of HTTP methods; null = all
    allow_http: bool = False  # plain-http upstreams, for local tests only
    connect_url: str | None = None  # where users re-authorize; default <public_url>/connect/<id>
    # -- the provider's OAuth dialect (proxy.dialect; textbook defaults) ------------------
    provider: Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")] | None = None
    parameters: dict[str, str] = Field(default_factory=dict)  # {name} values (catalog)
    authorize_params: dict[str, str] = Field(default_factory=dict)  # extra authorize params
    token_params: dict[str, str] = Field(default_factory=dict)  # every token request
    refresh_params: dict[str, str] = Field(default_factory=dict)  # refresh requests only
    # Slack, Zoom: ",". Not stripped: " " is a separator.
    scope_separator: Annotated[str, StringConstraints(strip_whitespace=False, min_length=1,
                                                      max_length=3)] = " "
    scope_param: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "scope"
    # Seconds, for a token response with no usable expiry (Salesforce sends none).
    default_expires_in: Annotated[StrictInt, Field(gt=0, le=31_536_000)] | None = None
    token_response: TokenResponse = Field(default_factory=TokenResponse)
    token_errors: TokenErrors = Field(default_factory=TokenErrors)
    api_signals: ApiSignals = Field(default_factory=ApiSignals)
    revocation: Revocation = Field(default_factory=Revocation)
    # -- grants bound to their tenant (proxy.binding, docs/tenants.md) -------------------
    grant_values: dict[str, GrantValueSettings] = Field(default_factory=dict)
    grant_hosts: list[str] = Field(default_factory=list)  # the grant's own hosts: templates
    resources: dict[_Id, ResourceSettings] = Field(default_factory=dict)

    @field_validator("authorize_params")
    @classmethod
    def _authorize_params(cls, v: dict[str, str]) -> dict[str, str]:
        return _not_reserved(v, RESERVED_AUTHORIZE_PARAMS)

    @field_validator("token_params", "refresh_params")
    @classmethod
    def _token_params(cls, v: dict[str, str]) -> dict[str, str]:
        return _not_reserved(v, RESERVED_TOKEN_PARAMS)

    @field_validator("methods")
    @classmethod
    def _methods(cls, v: list[str] | None) -> list[str] | None:
        if v is None:
            return None
        for m in v:
            # A method is a token (RFC 9110 section 9.1): "GET " or "" would never match.
            if not re.fullmatch(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+", m):
                raise ValueError(f"{m!r} is not an HTTP method")
        return [m.upper() for m in v]

    @model_validator(mode="before")
    @classmethod
    def _mcp_hosts(cls, data: Any) -> Any:
        """``hosts`` default to the ``mcp`` URL's host[:port] (the server's own host only);
        without a pre-registered ``client_id``, the client is public (``none``)."""
        if isinstance(data, Mapping) and isinstance(data.get("mcp"), str) \
                and "hosts" not in data:
            host = mcp_host(data["mcp"])
            if host is None:
                raise ValueError("mcp must be an https URL with a host (the MCP server's)")
            data = {**data, "hosts": [host]}
        if isinstance(data, Mapping) and data.get("mcp") and not data.get("client_id"):
            # Registered clients (metadata document, RFC 7591) are public: PKCE, no secret.
            data = {"token_endpoint_auth_method": "none", **data}
        return data

    @model_validator(mode="after")
    def _urls(self) -> Self:
        if self.mcp is not None:
            self._check_mcp()
        else:
            for name in ("token_url", "client_id"):
                if not getattr(self, name):
                    raise ValueError(f"{name} is required (or mcp: <server URL>, whose "
                                     "discovery gives the endpoints)")
        if self.issuer is not None:
            parts = urlsplit(self.issuer)
            if parts.scheme != "https" and not (self.allow_http and parts.scheme == "http") \
                    or not parts.hostname or parts.query or parts.fragment:
                raise ValueError("issuer must be an https URL without query or fragment "
                                 "(RFC 8414 section 2)")
        elif self.iss_required:
            raise ValueError("iss_required needs issuer (the value iss must have)")
        for name in ("token_url", "authorize_url", "revocation_url"):
            url = getattr(self, name)
            if url and not (url.startswith("https://") or (self.allow_http and
                                                           url.startswith("http://"))):
                raise ValueError(f"{name} must be an https URL")
        if self.client_secret_env and self.client_secret_file:
            raise ValueError("set only one of client_secret_env, client_secret_file")
        if self.token_endpoint_auth_method != "none" and not (
            self.client_secret_env or self.client_secret_file
        ):
            raise ValueError("client_secret_env or client_secret_file is required "
                             "(or token_endpoint_auth_method: none)")
        if self.scope_param in self.authorize_params:
            raise ValueError(f"authorize_params: {self.scope_param!r} is the scope_param")
        self._check_scopes()
        self._check_binding()
        return self

    def _check_scopes(self) -> None:
        """``scopes`` and ``required_scopes`` within ``scope_ceiling``; each a valid scope
        token (RFC 6749 section 3.3), named by key."""
        for key in ("scopes", "scope_ceiling", "required_scopes"):
            for i, scope in enumerate(getattr(self, key) or ()):
                if not _SCOPE_TOKEN.fullmatch(scope):
                    raise ValueError(f"{key}[{i}]: {scope!r} is not a scope token "
                                     "(RFC 6749 section 3.3: printable ASCII, no space, "
                                     "quote or backslash)")
        ceiling = self.scope_ceiling if self.scope_ceiling is not None else self.scopes
        for key in ("scopes", "required_scopes"):
            outside = [s for s in getattr(self, key) if s not in ceiling]
            if outside:
                raise ValueError(f"{key}: {outside} not in scope_ceiling {ceiling} (the "
                                 "ceiling bounds what a connect may ask for)")

    @property
    def allowed_scopes(self) -> list[str]:
        """The scope ceiling: what a user may choose at connect, in configured order
        (``scope_ceiling``, else ``scopes``; plus any default scope not in it, e.g. the
        ``offline_access`` an MCP server's discovery adds)."""
        ceiling = list(self.scope_ceiling if self.scope_ceiling is not None else self.scopes)
        return [*ceiling, *(s for s in self.scopes if s not in ceiling)]

    def _check_mcp(self) -> None:
        """An ``mcp`` entry: an absolute https URL (http with ``allow_http``) without a
        fragment or userinfo (RFC 8707 section 2: it is the ``resource``), whose host is one
        of ``hosts``; no endpoints of its own (they come from discovery, RFC 9728 / RFC
        8414); a client secret only with a pre-registered ``client_id``."""
        url = self.mcp or ""
        parts = urlsplit(url)
        if not (parts.scheme == "https" or (self.allow_http and parts.scheme == "http")):
            raise ValueError("mcp must be an https URL (the MCP server's)")
        if not parts.hostname or parts.fragment or "#" in url or "@" in parts.netloc:
            raise ValueError("mcp must be an absolute URL with a host, without a fragment or "
                             "user info (it is the token's resource, RFC 8707 section 2)")
        host = mcp_host(url)
        tls = parts.scheme == "https"
        port = parts.port or (443 if tls else 80)
        if host is None or not any(HostPattern.parse(p).matches(parts.hostname.lower(), port,
                                                                tls=tls) for p in self.hosts):
            raise ValueError(f"mcp: the server's host {host!r} is not one of hosts")
        given = [name for name in ("token_url", "authorize_url", "revocation_url")
                 if getattr(self, name)]
        if given:
            raise ValueError(f"{', '.join(given)}: not set with mcp (the authorization "
                             "server's metadata gives the endpoints)")
        if self.client_id and (self.client_secret_env or self.client_secret_file) \
                and self.issuer is None:
            # A pre-registered client's secret belongs to one authorization server: it is
            # never sent to whichever one the server's metadata names next.
            raise ValueError("issuer is required with mcp and a pre-registered client "
                             "secret: the issuer identifier of the authorization server "
                             "that issued client_id (RFC 8414 section 2)")
        if not self.client_id and (self.client_secret_env or self.client_secret_file):
            raise ValueError("a client secret needs the pre-registered client_id it "
                             "belongs to")
        if self.grant_values or self.resources or self.grant_hosts:
            raise ValueError("grant_values, grant_hosts and resources are not supported "
                             "with mcp")

    @property
    def mcp_resource(self) -> str | None:
        """The MCP server's canonical URI (RFC 8707 section 2; MCP authorization,
        "Canonical Server URI"): ``mcp`` with its scheme and host lower-cased; None for a
        provider that is not an MCP server."""
        return None if self.mcp is None else canonical_uri(self.mcp)

    def _check_binding(self) -> None:
        """Grant values may be used only where they are known (docs/tenants.md)."""
        values = self.grant_values
        binding.check_names(values)
        check = binding.check_template
        if self.authorize_url:
            check(self.authorize_url, where="authorize_url", values=values, sources=["choice"])
        check(self.token_url, where="token_url", values=values,
              sources=["choice", "callback"])
        for name in ("revocation_url", "connect_url"):
            text = getattr(self, name)
            if text:
                check(text, where=name, values=values,
                      sources=None if name == "revocation_url" else [])
        if self.revocation.console_url:
            check(self.revocation.console_url, where="revocation.console_url", values=values,
                  sources=None)
        for name, spec in values.items():
            for pattern in spec.allowed or ():
                if not binding.covers(self.ceiling(), pattern):
                    raise ValueError(f"grant_values.{name}.allowed: {pattern!r} is not within "
                                     f"the provider's hosts ({', '.join(self.ceiling())}): a "
                                     "value must never bind a host outside them")
            if spec.url is not None:
                check(spec.url, where=f"grant_values.{name}.url", values=values,
                      sources=["choice", "callback", "token_response"])
                # Never plain http, even with allow_http: the connect flow sends the new
                # access token to https URLs only.
                if not spec.url.startswith("https://"):
                    raise ValueError(f"grant_values.{name}.url must be an https URL")
                if not binding.placeholders(spec.url):
                    host = binding.host_value(spec.url.replace("http://", "https://", 1))
                    if host is None or not binding.within(host, self.hosts):
                        raise ValueError(f"grant_values.{name}.url: the discovery URL must be "
                                         "on one of the provider's own hosts "
                                         f"({', '.join(self.hosts)}): the user's token goes "
                                         "there")
        units: list[tuple[str, list[str], list[str]]] = [
            ("grant_hosts", self.grant_hosts, self.hosts)]
        units += [(f"resources.{rid}.grant_hosts", r.grant_hosts, r.hosts)
                  for rid, r in self.resources.items()]
        for where, templates, ceiling in units:
            for i, template in enumerate(templates):
                check(template, where=f"{where}[{i}]", values=values, sources=None)
                binding.check_host_template(template, where=f"{where}[{i}]")
                static = binding.host_value(template)
                if not binding.placeholders(template) and (
                        static is None or not binding.within(static, ceiling)):
                    raise ValueError(f"{where}[{i}]: {template!r} is not within "
                                     f"{', '.join(ceiling)}: no grant could ever use it")
        for rid, r in self.resources.items():
            for i, scope in enumerate(r.scopes):
                check(scope, where=f"resources.{rid}.scopes[{i}]", values=values,
                      sources=None)
        # "api.example.com" and "api.example.com:443" name the same destination.
        seen: dict[str, str] = {}
        routed = [("the provider", self.hosts),
                  *((f"its resource {rid!r}", r.hosts) for rid, r in self.resources.items())]
        for unit, hosts in routed:
            for h in hosts:
                canon = h if ":" in h.rsplit("]", 1)[-1] else f"{h}:443"
                if canon in seen:
                    raise ValueError(f"host {h!r} is listed by {seen[canon]} and by {unit}")
                seen[canon] = unit

    # -- per grant ---------------------------------------------------------------------
    @property
    def bound(self) -> bool:
        """Whether this provider binds its grants to values (has grant values)."""
        return bool(self.grant_values)

    def ceiling(self) -> list[str]:
        """Every host pattern of the provider and its resources."""
        return [*self.hosts, *(h for r in self.resources.values() for h in r.hosts)]

    def for_grant(self, values: GrantValues) -> ProviderSettings:
        """This provider with its endpoint URLs rendered with a grant's ``values`` (the
        same object when it has no grant values). Raises
        :class:`proxy.binding.BindingError` when a value the URLs use is missing."""
        if not self.grant_values:
            return self
        render = binding.render
        update: dict[str, object] = {"token_url": render(self.token_url, values)}
        # The others render once their values exist: the authorize URL before a grant has
        # more than its choices, the revocation URL once the token response gave its
        # values (Salesforce's {instance}). A URL left with a placeholder is never called:
        # see unrendered().
        for name in ("authorize_url", "revocation_url"):
            text = getattr(self, name)
            if text and binding.placeholders(text):
                try:
                    update[name] = render(text, values)
                except binding.BindingError:
                    continue
        console = self.revocation.console_url
        if console and binding.placeholders(console):
            try:
                update["revocation"] = self.revocation.model_copy(
                    update={"console_url": render(console, values)})
            except binding.BindingError:
                pass
        return self.model_copy(update=update)

    def unrendered(self) -> list[str]:
        """The endpoint URLs of this (:meth:`for_grant`) entry that still hold a grant
        value's placeholder: they lack a value and must not be called."""
        return [name for name in ("authorize_url", "token_url", "revocation_url")
                if (text := getattr(self, name)) and binding.placeholders(text)]

    def inject_for(self, resource: str | None) -> InjectSettings:
        """How the token is injected for ``resource`` (None: the provider's own hosts)."""
        if resource is not None:
            own = self.resources[resource].inject
            if own is not None:
                return own
        return self.inject

    def own_hosts(self, resource: str | None, values: GrantValues) -> list[HostPattern] | None:
        """The grant's own hosts for ``resource`` (None: the provider's hosts), rendered
        from its ``values`` and checked against the running ceiling; None when that unit
        has no ``grant_hosts`` (every host it routes receives the token). Raises
        :class:`proxy.binding.BindingError` (``grant_host_not_allowed`` for a host the
        ceiling no longer covers)."""
        unit_hosts, templates = ((self.hosts, self.grant_hosts) if resource is None else
                                 (self.resources[resource].hosts,
                                  self.resources[resource].grant_hosts))
        if not templates:
            return None
        hosts = binding.own_hosts(templates, values)
        for host in hosts:
            if not binding.within(host, unit_hosts):
                raise binding.BindingError(
                    "grant_host_not_allowed",
                    f"the grant's host {host} is not one of {', '.join(unit_hosts)}")
        return hosts

    def binding_problem(self, values: GrantValues) -> binding.BindingError | None:
        """Why a grant with ``values`` cannot be used under this (running) configuration:
        a value its hosts or token URL need is missing, or a host it binds is outside the
        ceiling (a grant made before the provider bound its grants, or before a reload
        narrowed ``hosts``). None when it can."""
        if not self.grant_values:
            return None
        try:
            self.for_grant(values)
            for resource in (None, *self.resources):
                self.own_hosts(resource, values)
        except binding.BindingError as exc:
            return exc
        return None

    def connect_choices(self, resource: str | None, host: str) -> dict[str, str]:
        """The connect link's parameters that lead back to the tenant of ``host`` (a
        destination this provider, or its ``resource``, routed): for each grant host
        template that is exactly one ``from: choice`` value (Shopify's ``{shop}``), that
        value's parameter set to ``host``. The link is checked again when opened."""
        templates = self.grant_hosts if resource is None else \
            self.resources[resource].grant_hosts
        out: dict[str, str] = {}
        for template in templates:
            names = binding.placeholders(template)
            if len(names) == 1 and template == "{" + names[0] + "}":
                spec = self.grant_values.get(names[0])
                if spec is not None and spec.source == "choice":
                    out[spec.param or names[0]] = host
        return out

    def resource_scopes(self, resource: str, values: GrantValues) -> list[str]:
        """The scopes to redeem the grant's refresh token with for ``resource``."""
        return [binding.render(s, values) for s in self.resources[resource].scopes]


class ConnectSettings(_Model):
    """The OAuth connect flow (`credproxy connect`, the admin server's /connect)."""

    state_ttl: Annotated[int, Field(ge=30, le=3600)] = 600  # seconds a started flow stays valid
    # Where the browser may be sent after a web connect: a return_to must have the same
    # scheme, host and port as one of these and its path at or below that one's (no open
    # redirect). Without one, a plain success page is shown.
    return_urls: list[str] = Field(default_factory=list)
    # Browsers cannot add headers: also accept the user context as ?context=<jws> on
    # /connect/{provider} (keep contexts short-lived; it appears in the URL).
    context_query: bool = True
    # Seconds a self-service page session lasts (the cookie set when a user context is
    # handed over at /connections or /connect/{provider}); then the agent's link again.
    session_ttl: Annotated[int, Field(ge=60, le=3600)] = 900

    @field_validator("return_urls")
    @classmethod
    def _returns(cls, v: list[str]) -> list[str]:
        for url in v:
            parts = _return_url(url)
            if parts is None:
                raise ValueError(f"{url!r}: return URLs must be absolute https URLs (or "
                                 "loopback http) without user info or fragment")
        return v

    def allows_return(self, url: str) -> bool:
        """Whether ``url`` is one of :attr:`return_urls` or below one (compared parsed:
        scheme, host, port, then path at a segment boundary)."""
        got = _return_url(url)
        if got is None:
            return False
        for allowed in self.return_urls:
            want = _return_url(allowed)
            if want is None or got[:3] != want[:3]:
                continue
            path, base = got[3], want[3]
            if path == base or path.startswith(base if base.endswith("/") else base + "/"):
                return True
        return False


def _return_url(url: str) -> tuple[str, str, int, str] | None:
    """(scheme, host, port, path) of an acceptable return URL, else None."""
    from urllib.parse import urlsplit

    if any(c in url for c in "\\ \t\r\n") or not url.isprintable():
        return None
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if (scheme not in ("https", "http") or not host or "@" in parts.netloc
            or parts.fragment or "#" in url):
        return None
    if scheme == "http" and not _is_loopback(host):
        return None
    path = parts.path or "/"
    segments = path.lower().replace("%2e", ".").split("/")
    if "." in segments or ".." in segments or "%2f" in path.lower() or "%5c" in path.lower():
        return None
    return scheme, host, port or (443 if scheme == "https" else 80), path


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RefreshSettings(_Model):
    attempts: Annotated[int, Field(ge=1, le=10)] = 3
    backoff: Annotated[float, Field(ge=0, le=30)] = 0.25  # seconds, doubled each retry
    timeout: Annotated[float, Field(gt=0, le=120)] = 10.0

    def max_duration(self) -> float:
        """The longest one refresh can take, retries and backoff included (each attempt
        has a hard deadline of ``timeout``)."""
        backoff = sum(self.backoff * 2.0**i for i in range(self.attempts - 1))
        return float(self.attempts * self.timeout + backoff)


class ReloadSettings(_Model):
    """How ``credproxy run`` takes a changed config file (docs/operations.md)."""

    # Provider ids this file removes on purpose. A reload that removes a provider, or a
    # host from one, is refused unless every such provider is listed here (in the new
    # file): a truncated or half-written file must never turn provider hosts into
    # unrouted ones, which would pass the agent's own Authorization through.
    allow_provider_removal: list[Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9_-]{0,62}$")]] = (
        Field(default_factory=list))
    # Guards this file relaxes on purpose (see proxy.app.refuse_loosening): "unrouted",
    # "identity.one_time_jti", "providers.<id>.methods", "providers.<id>.grant_hosts". A
    # reload that relaxes any other is refused: a file cut short silently drops trailing
    # keys, whose defaults are looser.
    allow_loosening: list[Annotated[str, Field(
        pattern=(r"^(unrouted|identity\.one_time_jti|"
                 r"providers\.[a-z0-9][a-z0-9_-]{0,62}\.(methods|grant_hosts))$")
    )]] = Field(default_factory=list)
    # Seconds the file (and the files it names) must stay unchanged before it is parsed,
    # so a file being written in place is never read half-way.
    settle: Annotated[float, Field(ge=0, le=60)] = 2.0


class Settings(_Model):
    listen: str = "127.0.0.1:8080"
    admin: str | None = "127.0.0.1:9090"  # null: no admin server
    public_url: str | None = None
    ca_dir: str = "~/.credproxy/ca"
    upstream_ca_file: str | None = None
    unrouted: Literal["passthrough", "deny", "tunnel"] = "passthrough"
    stream_large_bodies: str = "1m"
    # HTTP/2 between agent and proxy (and on to the provider). Off: mitmproxy turns an
    # HTTP/2 request without Content-Length into an HTTP/1 request with no framing when the
    # provider speaks only HTTP/1, and the provider then reads an empty body.
    http2: bool = False
    identity: IdentitySettings
    vault: VaultSettings = Field(default_factory=VaultSettings)
    coordination: CoordinationSettings = Field(default_factory=CoordinationSettings)
    audit: AuditSettings = Field(default_factory=AuditSettings)
    refresh: RefreshSettings = Field(default_factory=RefreshSettings)
    connect: ConnectSettings = Field(default_factory=ConnectSettings)
    reload: ReloadSettings = Field(default_factory=ReloadSettings)
    providers: list[ProviderSettings] = Field(default_factory=list)

    _addr = field_validator("listen", "admin")(
        classmethod(lambda cls, v: v if v is None else _address(v)))

    @field_validator("stream_large_bodies")
    @classmethod
    def _size(cls, v: str) -> str:
        # mitmproxy's size syntax (mitmproxy.utils.human.parse_size), checked here so a
        # bad value is a config error, not a traceback when the proxy starts.
        if not re.fullmatch(r"[0-9]+[bkmgt]?", v):
            raise ValueError("must be a size: a number of bytes with an optional unit "
                             "b, k, m, g or t (e.g. 1m)")
        return v

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, v: str | None) -> str | None:
        from urllib.parse import urlsplit

        if v is None:
            return v
        try:
            parts = urlsplit(v)
            parts.port  # noqa: B018 - raises ValueError on a bad port
        except ValueError:
            parts = None
        if (parts is None or parts.scheme not in ("http", "https") or not parts.hostname
                or parts.query or parts.fragment or parts.username is not None
                or any(c.isspace() for c in v)):
            raise ValueError("must be an absolute http(s) URL (scheme and host, no query, "
                             "fragment or user info), e.g. https://credproxy.example.com")
        return v

    @model_validator(mode="after")
    def _unique(self) -> Self:
        ids = [p.id for p in self.providers]
        dupes = {i for i in ids if ids.count(i) > 1}
        if dupes:
            raise ValueError(f"duplicate provider ids: {sorted(dupes)}")
        identity = {field_key(self.identity.header), field_key("Proxy-Authorization")}
        for p in self.providers:
            # Identity headers are stripped from every request under every spelling: a
            # credential injected under one of those names would never arrive.
            for inject in (p.inject, *(r.inject for r in p.resources.values() if r.inject)):
                if field_key(inject.header) in identity:
                    raise ValueError(f"providers {p.id!r}: inject.header {inject.header!r} "
                                     "is the user-context header or Proxy-Authorization")
        seen: dict[str, ProviderSettings] = {}
        for p in self.providers:
            for h in p.ceiling():
                # "api.example.com" and "api.example.com:443" name the same destination.
                canon = h if ":" in h.rsplit("]", 1)[-1] else f"{h}:443"
                other = seen.get(canon)
                if other is not None and not _distinct_mcp_servers(other, p):
                    raise ValueError(f"host {h!r} is listed by providers {other.id!r} and "
                                     f"{p.id!r} (two MCP servers may share a host when "
                                     "neither's path is within the other's)")
                seen.setdefault(canon, p)
        return self

    @property
    def connect_base(self) -> str:
        return (self.public_url or f"http://{self.admin or self.listen}").rstrip("/")

    @property
    def redirect_uri(self) -> str:
        """The OAuth redirect URI of the web connect flow."""
        return f"{self.connect_base}/oauth/callback"

    def connect_url(self, provider: ProviderSettings) -> str:
        return provider.connect_url or f"{self.connect_base}/connect/{provider.id}"

    def provider(self, provider_id: str) -> ProviderSettings:
        for p in self.providers:
            if p.id == provider_id:
                return p
        raise ConfigError(f"providers: no provider with id {provider_id!r}")


def _distinct_mcp_servers(a: ProviderSettings, b: ProviderSettings) -> bool:
    """Two MCP servers on one host, told apart by their paths (the router picks by the
    request's path, proxy.routes): neither endpoint may lie within the other's."""
    ra, rb = a.mcp_resource, b.mcp_resource
    if ra is None or rb is None:
        return False
    return not path_within(ra, urlsplit(rb).path or "/") and not path_within(
        rb, urlsplit(ra).path or "/")


def mcp_host(url: str) -> str | None:
    """The ``hosts`` entry of an MCP server URL: its host, with the port when it is not the
    scheme's default; None when it has none or it is not a valid host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError:
        return None
    if not parts.hostname:
        return None
    default = {"https": 443, "http": 80}.get(parts.scheme.lower())
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    text = host if port is None or port == default else f"{host}:{port}"
    try:
        return validate_host_pattern(text)
    except ValueError:
        return None


def validate_host_pattern(pattern: str) -> str:
    """Normalise a provider host entry (see :class:`proxy.hosts.HostPattern`)."""
    return str(HostPattern.parse(pattern))


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, but a key given twice in one mapping is an error (plain YAML
    lets the last one win silently, so a stray duplicate would override the first)."""

    def construct_mapping(self, node: yaml.MappingNode,
                          deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                continue
            line = key_node.start_mark.line + 1
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given on line {first})",
                    key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_settings(path: str | os.PathLike[str], *, catalog: Catalog | None = None) -> Settings:
    """Read and validate a YAML config file. Raises :class:`ConfigError` naming the file
    and the key (or the line, for YAML errors such as a key given twice)."""
    p = Path(path).expanduser()
    try:
        data = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # noqa: S506
    except OSError as exc:
        raise ConfigError(f"cannot read config file {p}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise ConfigError(f"{p}: not UTF-8 text") from None
    except yaml.MarkedYAMLError as exc:
        # "FILE: not valid YAML: line N: what", without the quoted snippet of the file.
        mark = exc.problem_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        what = exc.problem or str(exc)
        if exc.context and "duplicate key" not in what:
            what = f"{exc.context}: {what}"
        raise ConfigError(f"{p}: not valid YAML: {where}{what}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{p}: not valid YAML: {exc}") from None
    return parse_settings(data, source=str(p), catalog=catalog)


def parse_settings(data: Any, *, source: str = "config",
                   catalog: Catalog | None = None) -> Settings:
    """Validate a parsed config. Provider entries with ``provider: <id>`` start from the
    catalog entry (:func:`proxy.dialect.expand_provider`; ``catalog``: another catalog
    directory than the built-in one, for tests)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: the top level must be a mapping")
    providers = data.get("providers")
    if isinstance(providers, list):
        try:
            expanded = [expand_provider(p, where=f"providers[{i}]", catalog=catalog)
                        if isinstance(p, Mapping) else p for i, p in enumerate(providers)]
        except ConfigError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        data = {**data, "providers": expanded}
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{source}: " + "; ".join(_describe(e) for e in exc.errors())) from None


def _describe(error: Mapping[str, Any]) -> str:
    key = ""
    for part in error["loc"]:
        key += f"[{part}]" if isinstance(part, int) else (f".{part}" if key else str(part))
    msg = str(error["msg"]).removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        msg = "unknown key"
    return f"{key or '(top level)'}: {msg}"


def resolve_secret(*, env: str | None, file: str | None, what: str,
                   environ: Mapping[str, str] = os.environ) -> Secret:
    """Read a secret named by ``*_env`` or ``*_file``; errors name the source, never the value."""
    if env:
        value = environ.get(env)
        if not value:
            raise ConfigError(f"{what}: environment variable {env} is not set")
        return Secret(value)
    if file:
        try:
            value = Path(file).expanduser().read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {file}: {exc.strerror}") from exc
        except UnicodeDecodeError:
            raise ConfigError(f"{what}: {file} is not UTF-8 text") from None
        if not value:
            raise ConfigError(f"{what}: {file} is empty")
        return Secret(value)
    raise ConfigError(f"{what}: no secret configured")
