#!/usr/bin/env bash
# TLS certificates for a SuperLink, and one EC key pair per SuperNode (for SuperNode authentication).
#
# usage: deploy/generate_certs.sh OUT_DIR NUM_SUPERNODES [SERVER_NAMES]
#   OUT_DIR         folder to create (certificates/ and keys/ inside)
#   NUM_SUPERNODES  how many SuperNode key pairs: keys/supernode_<i>{,.pub}, i = 0..N-1
#   SERVER_NAMES    subjectAltName entries of the SuperLink certificate
#                   (default "DNS:localhost,IP:127.0.0.1,DNS:superlink"; add your host's name or IP)
#
# Writes certificates/ca.crt (give it to SuperNodes and to the `flwr` CLI),
# certificates/server.pem and certificates/server.key (the SuperLink's), and
# keys/supernode_<i> (private, stays on SuperNode i) with keys/supernode_<i>.pub
# (register it with `flwr supernode register keys/supernode_<i>.pub <superlink>`).
# Self-signed, for tests and private deployments; use your organisation's CA otherwise.
set -euo pipefail
out=${1:?usage: generate_certs.sh OUT_DIR NUM_SUPERNODES [SERVER_NAMES]}
num=${2:?usage: generate_certs.sh OUT_DIR NUM_SUPERNODES [SERVER_NAMES]}
names=${3:-DNS:localhost,IP:127.0.0.1,DNS:superlink}
mkdir -p "$out/certificates" "$out/keys"
cd "$out/certificates"
openssl req -x509 -newkey rsa:2048 -nodes -sha256 -days 365 -subj "/CN=FedGrow CA" \
  -keyout ca.key -out ca.crt 2>/dev/null
openssl req -newkey rsa:2048 -nodes -sha256 -subj "/CN=superlink" -keyout server.key -out server.csr 2>/dev/null
printf "subjectAltName=%s\n" "$names" > server.ext
openssl x509 -req -sha256 -days 365 -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial \
  -extfile server.ext -out server.pem 2>/dev/null
rm -f server.csr server.ext ca.srl
cd ../keys
for ((i = 0; i < num; i++)); do
  rm -f "supernode_$i" "supernode_$i.pub"
  ssh-keygen -q -t ecdsa -b 384 -N "" -C "" -f "supernode_$i"
done
echo "wrote $out/certificates (ca.crt, server.pem, server.key) and $num SuperNode key pairs in $out/keys"
