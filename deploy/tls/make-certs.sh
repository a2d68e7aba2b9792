#!/usr/bin/env bash
# Dask TLS for the compose stack: a local CA and one certificate for every Dask process
# (scheduler, workers, the flow's client), written next to this script. Dask checks that
# the peer's certificate is signed by the CA (it does not check host names).
# For production, use certificates from your own CA instead.
set -euo pipefail
cd "$(dirname "$0")"
days=${DAYS:-365}
openssl req -x509 -newkey rsa:3072 -nodes -days "$days" -subj "/CN=segpipe-dask-ca" \
  -keyout ca-key.pem -out ca.pem
openssl req -newkey rsa:3072 -nodes -subj "/CN=segpipe-dask" \
  -keyout dask-key.pem -out dask.csr
openssl x509 -req -in dask.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -days "$days" \
  -out dask.pem
rm -f dask.csr ca.srl
# The CA key signs nothing more: keep it out of reach. The containers run as uid 10001
# and read the secrets through bind mounts, so the Dask key must be readable by them.
chmod 600 ca-key.pem
chmod 644 ca.pem dask.pem dask-key.pem
echo "wrote $(pwd)/{ca.pem,dask.pem,dask-key.pem}"
