#!/usr/bin/env bash
# Make (or update) one Secret per startup kit, from the kits `fedbus provision` wrote:
#   fedbus provision deploy/project.toml -o deploy/kits && bash deploy/k8s/secrets.sh deploy/kits
# Updating the broker's Secret (participants.toml, e.g. a revocation) reaches the running broker within
# the kubelet's sync period: it reads participants.toml straight from the mounted Secret.
set -euo pipefail
KITS="${1:-deploy/kits}"
NS="${NAMESPACE:-fedbus}"
kubectl get namespace "$NS" >/dev/null 2>&1 || kubectl create namespace "$NS"
for kit in broker site-1 site-2 site-3; do
    kubectl -n "$NS" create secret generic "fedbus-kit-$kit" --from-file="$KITS/$kit" \
        --dry-run=client -o yaml | kubectl apply -f -
done
