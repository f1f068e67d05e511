#!/bin/sh
# credproxy egress lockdown (kustomize component egress-lockdown; docs/kubernetes.md).
#
# Runs once, as the first init container of the pod, with NET_ADMIN and NET_RAW: it installs
# packet filter rules in the pod's network namespace (shared by every container of the pod)
# so that only processes running as the proxy's UID may open outbound connections. The
# agent can then reach the outside world only through credproxy on loopback; unsetting
# HTTPS_PROXY gets it a connection refused, not a way around the proxy.
#
# OUTPUT, for every new packet leaving the pod:
#   loopback                          -> allowed (the agent talks to credproxy on 127.0.0.1)
#   replies on established flows      -> allowed (inbound connections, probes)
#   socket owned by PROXY_UID         -> allowed (credproxy: upstreams, DNS, token endpoints)
#   destination in EGRESS_ALLOW_CIDRS -> allowed (optional, e.g. the cluster's service CIDR)
#   IPv6 neighbour/router discovery   -> allowed (kernel packets without an owning socket)
#   anything else                     -> rejected (TCP reset / ICMP unreachable: fails fast)
#
# DNS is not special-cased: the proxy resolves names for the agent (an HTTP proxy client
# sends CONNECT host:port and resolves nothing itself), so only PROXY_UID needs DNS. An
# agent that needs DNS for NO_PROXY destinations gets it by listing the cluster DNS service
# address (inside the service CIDR) in EGRESS_ALLOW_CIDRS, which also opens DNS queries to
# arbitrary names: a (slow) exfiltration channel. That is the trade-off.
#
# Environment:
#   PROXY_UID           numeric UID of the credproxy sidecar (default 10001, the image's);
#                       the agent must never run as this UID
#   EGRESS_ALLOW_CIDRS  comma/space separated IPv4/IPv6 CIDRs any container may reach
#                       directly (default: none)
#   IPTABLES_BACKEND    nft, legacy or auto (default auto: nft, then legacy)
#
# Both families are locked down: IPv4 always; IPv6 whenever the kernel has it in this
# namespace. Failing to install either is fatal (the pod does not start), never silent.
set -eu

PROXY_UID="${PROXY_UID:-10001}"
ALLOW="$(printf '%s' "${EGRESS_ALLOW_CIDRS:-}" | tr ',' ' ')"
BACKEND="${IPTABLES_BACKEND:-auto}"
CHAIN=CREDPROXY-EGRESS

die() { echo "egress-lockdown: $*" >&2; exit 1; }

case "$PROXY_UID" in
  ''|*[!0-9]*) die "PROXY_UID must be a numeric UID, got '$PROXY_UID'" ;;
esac
[ "$PROXY_UID" -ne 0 ] || die "PROXY_UID must not be 0 (root would bypass the lockdown)"
for cidr in $ALLOW; do
  case "$cidr" in
    *[!0-9a-fA-F.:/]*|'') die "EGRESS_ALLOW_CIDRS: '$cidr' is not an IP address or CIDR" ;;
  esac
done
case "$BACKEND" in
  auto) BACKENDS="nft legacy" ;;
  nft|legacy) BACKENDS=$BACKEND ;;
  *) die "IPTABLES_BACKEND must be nft, legacy or auto, got '$BACKEND'" ;;
esac

# rules FAMILY: the filter table for iptables-restore (FAMILY 4) or ip6tables-restore (6).
rules() {
  family=$1
  echo "*filter"
  echo ":INPUT ACCEPT [0:0]"
  echo ":FORWARD ACCEPT [0:0]"
  echo ":OUTPUT ACCEPT [0:0]"
  echo ":$CHAIN - [0:0]"
  echo "-A OUTPUT -j $CHAIN"
  echo "-A $CHAIN -o lo -j RETURN"
  echo "-A $CHAIN -m conntrack --ctstate ESTABLISHED,RELATED -j RETURN"
  echo "-A $CHAIN -m owner --uid-owner $PROXY_UID -j RETURN"
  for cidr in $ALLOW; do
    case "$cidr" in
      *:*) [ "$family" = 6 ] && echo "-A $CHAIN -d $cidr -j RETURN" ;;
      *) [ "$family" = 4 ] && echo "-A $CHAIN -d $cidr -j RETURN" ;;
    esac
  done
  if [ "$family" = 6 ]; then
    for t in router-solicitation neighbour-solicitation neighbour-advertisement; do
      echo "-A $CHAIN -p ipv6-icmp -m icmp6 --icmpv6-type $t -j RETURN"
    done
    echo "-A $CHAIN -p tcp -j REJECT --reject-with tcp-reset"
    echo "-A $CHAIN -j REJECT --reject-with icmp6-port-unreachable"
  else
    echo "-A $CHAIN -p tcp -j REJECT --reject-with tcp-reset"
    echo "-A $CHAIN -j REJECT --reject-with icmp-port-unreachable"
  fi
  echo "COMMIT"
}

# apply FAMILY: load the rules with the first backend that works; print which one.
apply() {
  family=$1
  tool=iptables
  [ "$family" = 6 ] && tool=ip6tables
  for b in $BACKENDS; do
    if command -v "$tool-$b-restore" >/dev/null 2>&1 &&
       rules "$family" | "$tool-$b-restore"; then
      echo "$tool-$b"
      return 0
    fi
  done
  return 1
}

# The whole filter table is replaced (not --noflush): the pod's namespace is new, and a
# re-run after a sandbox restart installs exactly the same rules.
v4=$(apply 4) || die "could not install the IPv4 rules (does the container have NET_ADMIN and NET_RAW?)"
echo "egress-lockdown: IPv4 rules installed ($v4): only UID $PROXY_UID may connect out"
"$v4" -S "$CHAIN"

if [ -e /proc/net/if_inet6 ]; then
  v6=$(apply 6) || die "IPv6 is enabled in this pod but the IPv6 rules could not be installed"
  echo "egress-lockdown: IPv6 rules installed ($v6)"
  "$v6" -S "$CHAIN"
else
  echo "egress-lockdown: IPv6 is disabled in this pod: no IPv6 rules needed"
fi
