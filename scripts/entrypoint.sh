#!/bin/sh
# The image's ENTRYPOINT (Dockerfile.gpu): started as root only to make the network volume's
# sdxl-lora folder usable by the service user, then the command (`python -m handler`, or a start
# command set on the endpoint) runs as that user, never as root. The postgres and redis images'
# entrypoints do the same with their data directories.
#
# RunPod mounts a network volume root-owned at /runpod-volume. Here /runpod-volume/sdxl-lora (the
# LoRA cache in loras/, the idempotency store in idempotency/, the compile cache in compile/) is
# created and given to uid 1000, not recursively: everything inside is written by that user. A
# volume that cannot be prepared (read-only, root-squashed NFS) is said here, and the worker falls
# back to a private cache (its log and /readyz say so too).
set -eu
APP_USER=${APP_USER:-app}
APP_UID=$(id -u "$APP_USER")
APP_GID=$(id -g "$APP_USER")
VOLUME=${RUNPOD_VOLUME:-/runpod-volume}
SHARED="$VOLUME/sdxl-lora"

if [ "$(id -u)" = 0 ]; then
  if [ -d "$VOLUME" ]; then
    if mkdir -p "$SHARED/loras" "$SHARED/idempotency" "$SHARED/compile" 2>/dev/null \
       && chown "$APP_UID:$APP_GID" "$SHARED" "$SHARED/loras" "$SHARED/idempotency" "$SHARED/compile" 2>/dev/null \
       && setpriv --reuid="$APP_UID" --regid="$APP_GID" --init-groups test -w "$SHARED/loras"; then
      echo "entrypoint: $SHARED is shared by the workers, owned by $APP_USER (uid $APP_UID)" >&2
    else
      echo "entrypoint: $SHARED could not be prepared for $APP_USER (uid $APP_UID): read-only or root-squashed volume?" \
           "The worker falls back to a cache of its own." >&2
    fi
  fi
  export HOME
  HOME=$(getent passwd "$APP_USER" | cut -d: -f6)
  exec setpriv --reuid="$APP_UID" --regid="$APP_GID" --init-groups -- "$@"
fi
exec "$@"
