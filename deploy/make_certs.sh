#!/usr/bin/env bash
# Make the TLS certificates of a consortium SuperLink and the SuperNode authentication keys of
# its sites, with openssl only (no ssh-keygen, no Python).
#
# usage: deploy/make_certs.sh [--force] OUT_DIR [SITE ...]        (default sites: site_a site_b site_c)
#        deploy/make_certs.sh --keys-only OUT_DIR SITE [SITE ...] (site key pairs only, no CA)
#
#   OUT_DIR/ca.key, OUT_DIR/ca.crt             self-signed CA (ca.crt goes to every site and to `flwr`)
#   OUT_DIR/superlink/server.key, server.pem   SuperLink TLS key + cert signed by the CA;
#                                              SAN DNS:localhost, DNS:superlink, IP:127.0.0.1
#                                              (+ $SUPERLINK_SANS, e.g. "DNS:link.example.org,IP:10.0.0.5")
#   OUT_DIR/SITE/auth.key, auth.pub            ECDSA P-384 key pair for SuperNode authentication in the
#                                              OpenSSH formats flwr 1.41 reads: auth.key is passed to
#                                              `flower-supernode --auth-supernode-private-key`, auth.pub
#                                              to `flwr supernode register`.
#
# An existing CA is never overwritten without --force (--force regenerates everything).
# Existing site key pairs are kept unless --force; --keys-only never touches the CA.
# In a real consortium each site runs `--keys-only` on its own machine and sends only auth.pub.
set -euo pipefail

DAYS_CA=3650
DAYS_SERVER=825

die() { echo "make_certs.sh: $*" >&2; exit 1; }
usage() { sed -n '5,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

force=0
keys_only=0
positional=()
for arg in "$@"; do
  case "$arg" in
    --force) force=1 ;;
    --keys-only) keys_only=1 ;;
    -h|--help) usage ;;
    -*) die "unknown option: $arg" ;;
    *) positional+=("$arg") ;;
  esac
done
[ "${#positional[@]}" -ge 1 ] || usage
out="${positional[0]}"
sites=("${positional[@]:1}")
if [ "${#sites[@]}" -eq 0 ]; then
  [ "$keys_only" -eq 0 ] || die "--keys-only needs at least one SITE"
  sites=(site_a site_b site_c)
fi
for s in "${sites[@]}"; do
  [[ "$s" =~ ^[A-Za-z0-9_.-]+$ ]] || die "invalid site name: $s"
  case "$s" in superlink) die "'superlink' is reserved" ;; esac
done
command -v openssl >/dev/null || die "openssl not found"

made=()
umask 077
mkdir -p "$out"

# ---------- helpers for the OpenSSH key format (RFC 4251 wire encoding, built as hex) ----------
u32hex() { printf '%08x' "$1"; }
# sshstr HEX -> uint32 length (bytes) + bytes
sshstr() { u32hex $(( ${#1} / 2 )); printf '%s' "$1"; }
strhex() { printf '%s' "$1" | od -An -v -tx1 | tr -d ' \n'; }
hex2bin() { printf '%b' "$(printf '%s' "$1" | sed 's/../\\x&/g')"; }
b64() { openssl base64 -A; }

make_site_key() {  # make_site_key DIR COMMENT
  local dir="$1" comment="$2" tmp der d q keytype curve pubblob mpint chk priv pad i body
  mkdir -p "$dir"
  tmp="$(mktemp -d)"
  openssl ecparam -name secp384r1 -genkey -noout -out "$tmp/k.pem" 2>/dev/null
  # ECPrivateKey DER for P-384 has a fixed layout (RFC 5915): 8-byte header, 48-byte secret,
  # curve OID, then the 97-byte uncompressed public point at the end.
  der="$(openssl ec -in "$tmp/k.pem" -outform DER 2>/dev/null | od -An -v -tx1 | tr -d ' \n')"
  rm -rf "$tmp"
  [ "${#der}" -eq 334 ] && [ "${der:0:16}" = "3081a40201010430" ] \
    || die "unexpected EC key encoding from openssl"
  d="${der:16:96}"
  q="${der: -194}"
  [ "${q:0:2}" = "04" ] || die "unexpected EC public point encoding"
  keytype="$(strhex ecdsa-sha2-nistp384)"
  curve="$(strhex nistp384)"
  pubblob="$(sshstr "$keytype")$(sshstr "$curve")$(sshstr "$q")"
  # mpint: minimal big-endian, with a 00 byte in front when the top bit is set
  mpint="$d"
  while [ "${mpint:0:2}" = "00" ] && [ "${#mpint}" -gt 2 ]; do mpint="${mpint:2}"; done
  case "${mpint:0:1}" in [89a-f]) mpint="00$mpint" ;; esac
  chk="$(openssl rand -hex 4)"
  priv="${chk}${chk}$(sshstr "$keytype")$(sshstr "$curve")$(sshstr "$q")$(sshstr "$mpint")"
  priv="${priv}$(sshstr "$(strhex "$comment")")"
  pad=1
  while [ $(( (${#priv} / 2) % 8 )) -ne 0 ]; do priv="${priv}$(printf '%02x' "$pad")"; pad=$((pad + 1)); done
  body="$(strhex openssh-key-v1)00$(sshstr "$(strhex none)")$(sshstr "$(strhex none)")$(sshstr "")"
  body="${body}$(u32hex 1)$(sshstr "$pubblob")$(sshstr "$priv")"
  {
    echo "-----BEGIN OPENSSH PRIVATE KEY-----"
    hex2bin "$body" | b64 | fold -w 70
    echo
    echo "-----END OPENSSH PRIVATE KEY-----"
  } > "$dir/auth.key"
  chmod 600 "$dir/auth.key"
  printf 'ecdsa-sha2-nistp384 %s %s\n' "$(hex2bin "$pubblob" | b64)" "$comment" > "$dir/auth.pub"
  chmod 644 "$dir/auth.pub"
  made+=("$dir/auth.key  (SuperNode auth private key, OpenSSH ECDSA P-384; stays at the site)")
  made+=("$dir/auth.pub  (public key for 'flwr supernode register')")
}

# ---------- CA and SuperLink server certificate ----------
if [ "$keys_only" -eq 0 ]; then
  if [ -e "$out/ca.key" ] || [ -e "$out/ca.crt" ]; then
    [ "$force" -eq 1 ] || die "$out/ca.crt exists; refusing to overwrite the CA (use --force to regenerate everything)"
  fi
  openssl req -x509 -newkey rsa:4096 -nodes -sha256 -days "$DAYS_CA" \
    -keyout "$out/ca.key" -out "$out/ca.crt" -subj "/O=ecgtwin consortium/CN=ecgtwin consortium CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    2>/dev/null
  chmod 600 "$out/ca.key"; chmod 644 "$out/ca.crt"
  made+=("$out/ca.key  (CA private key: keep offline, never ship)")
  made+=("$out/ca.crt  (CA certificate: give to every site and to the flwr CLI)")

  mkdir -p "$out/superlink"
  san="DNS:localhost,DNS:superlink,IP:127.0.0.1${SUPERLINK_SANS:+,$SUPERLINK_SANS}"
  openssl req -new -newkey rsa:4096 -nodes -sha256 \
    -keyout "$out/superlink/server.key" -out "$out/superlink/server.csr" \
    -subj "/O=ecgtwin consortium/CN=superlink" 2>/dev/null
  ext="$(mktemp)"
  printf '%s\n' "basicConstraints=critical,CA:FALSE" \
    "keyUsage=critical,digitalSignature,keyEncipherment" \
    "extendedKeyUsage=serverAuth" "subjectAltName=$san" > "$ext"
  openssl x509 -req -sha256 -days "$DAYS_SERVER" -in "$out/superlink/server.csr" \
    -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -CAserial "$out/ca.srl" \
    -extfile "$ext" -out "$out/superlink/server.pem" 2>/dev/null
  rm -f "$ext" "$out/superlink/server.csr"
  openssl verify -CAfile "$out/ca.crt" "$out/superlink/server.pem" >/dev/null \
    || die "server certificate does not verify against the CA"
  chmod 600 "$out/superlink/server.key"; chmod 644 "$out/superlink/server.pem"
  made+=("$out/superlink/server.key  (SuperLink TLS key)")
  made+=("$out/superlink/server.pem  (SuperLink TLS cert, SAN $san)")
fi

# ---------- site key pairs ----------
for s in "${sites[@]}"; do
  if [ -e "$out/$s/auth.key" ] && [ "$force" -eq 0 ]; then
    echo "kept existing $out/$s/auth.key (use --force to replace)"
    continue
  fi
  make_site_key "$out/$s" "$s"
done

echo "made in $out:"
for m in "${made[@]}"; do echo "  $m"; done
