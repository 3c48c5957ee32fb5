#!/bin/sh
# A self-signed TLS certificate for deploy/nginx/nginx.conf, for trying TLS end to end:
#   sh deploy/nginx/make-cert.sh DIR [HOSTNAME]     -> DIR/server.crt, DIR/server.key
# Clients trust DIR/server.crt as their CA (`--ca-cert`, curl --cacert). In production use a
# certificate from your CA (e.g., cert-manager on Kubernetes, Let's Encrypt).
set -eu
dir=${1:?usage: make-cert.sh DIR [HOSTNAME]}
host=${2:-localhost}
mkdir -p "$dir"
openssl req -x509 -newkey rsa:2048 -nodes -days 365 -subj "/CN=$host" \
    -addext "subjectAltName=DNS:$host,DNS:localhost,IP:127.0.0.1" \
    -keyout "$dir/server.key" -out "$dir/server.crt" 2>/dev/null
chmod 600 "$dir/server.key"
echo "wrote $dir/server.crt and $dir/server.key (CN=$host)"
