# syntax=docker/dockerfile:1
#
# credproxy sidecar image: small, non-root, read-only-root-filesystem compatible.
#
#   docker build -t credproxy:0.1.0 .                                      # the sidecar
#   docker build --target egress-init -t credproxy-egress-init:0.1.0 .     # optional, see
#                                        # deploy/k8s/components/egress-lockdown
#
# The base image is pinned by tag. For reproducible production builds pin it by digest as
# well and let a bot (Renovate, Dependabot) bump it, e.g.
#   --build-arg PYTHON_IMAGE=python:3.13.9-slim-trixie@sha256:<digest>
# (`docker buildx imagetools inspect python:3.13.9-slim-trixie` prints the digest).
ARG PYTHON_IMAGE=python:3.13.9-slim-trixie

# ---- builder: resolve and install the pinned dependencies into a self-contained venv ----
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN python -m venv /opt/venv
WORKDIR /src
# LICENSE: setuptools puts it in the package's .dist-info/licenses/, so the image ships
# the text its org.opencontainers.image.licenses label names.
COPY pyproject.toml constraints.txt README.md LICENSE ./
COPY proxy ./proxy
COPY addons ./addons
# Every dependency ships binary wheels for CPython 3.13 on manylinux, so no compiler is
# needed even here. pip byte-compiles at install time: the read-only root filesystem means
# Python can never write .pyc files at run time.
RUN /opt/venv/bin/pip install --only-binary=:all: --no-binary=credproxy \
        -c constraints.txt . \
 && /opt/venv/bin/pip uninstall -y pip \
 && /opt/venv/bin/credproxy --help >/dev/null

# ---- egress-init: iptables for the optional egress-lockdown init container ----
# Same base as the runtime (shared layers); runs as root with NET_ADMIN/NET_RAW only in an
# init container, never as the sidecar. Not built unless asked for with --target.
# The iptables package is not pinned by default: Debian's mirrors carry only the current
# version of a suite, so a pinned version stops building at its next security update.
# Reproducible builds pin the base image by digest (above) and, if needed, the package:
#   --build-arg IPTABLES_VERSION=<version>   (`apt-cache policy iptables` in the image)
# together with a snapshot.debian.org source for the base image's date.
FROM ${PYTHON_IMAGE} AS egress-init
ARG IPTABLES_VERSION=
RUN apt-get update \
 && apt-get install -y --no-install-recommends "iptables${IPTABLES_VERSION:+=${IPTABLES_VERSION}}" \
 && rm -rf /var/lib/apt/lists/*
ENTRYPOINT ["/bin/sh"]

# ---- runtime: the sidecar (the default target: it is the last stage) ----
FROM ${PYTHON_IMAGE} AS runtime
LABEL org.opencontainers.image.title="credproxy" \
      org.opencontainers.image.description="Per-user OAuth credential-injecting forward proxy (mitmproxy addon) sidecar" \
      org.opencontainers.image.licenses="Apache-2.0"
# A fixed numeric UID/GID (Kubernetes runAsNonRoot can only verify a numeric USER). The
# egress-lockdown component allows outbound connections by this UID. Building with another
# value means changing the manifests too: runAsUser/runAsGroup/fsGroup of credproxy and
# credproxy-init and egress-lockdown's PROXY_UID (tests/deploy checks they agree).
ARG CREDPROXY_UID=10001
RUN groupadd --system --gid "${CREDPROXY_UID}" credproxy \
 && useradd --system --uid "${CREDPROXY_UID}" --gid credproxy --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin credproxy \
 && mkdir -p /etc/credproxy /var/lib/credproxy/ca /var/lib/credproxy/vault \
 && chown -R "${CREDPROXY_UID}:${CREDPROXY_UID}" /var/lib/credproxy \
 && chmod 0700 /var/lib/credproxy/ca /var/lib/credproxy/vault
COPY --from=builder /opt/venv /opt/venv
# The only writable paths at run time are mounted volumes: /tmp (HOME points there),
# /var/lib/credproxy/ca and /var/lib/credproxy/vault.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    HOME=/tmp \
    CREDPROXY_CONFIG=/etc/credproxy/config/credproxy.yaml
USER ${CREDPROXY_UID}:${CREDPROXY_UID}
WORKDIR /tmp
# 8080: the proxy (bind it to loopback in a pod); 9090: the admin server (probes, metrics).
EXPOSE 8080 9090
ENTRYPOINT ["credproxy", "run"]
CMD []
