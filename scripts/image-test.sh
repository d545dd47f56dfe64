#!/usr/bin/env bash
# The production image, tested the way it runs: build Dockerfile.gpu, then run the RunPod worker
# inside it as its non-root user, with no network, a tiny synthetic model mounted read-only and a
# root-owned volume at /runpod-volume.
#
#   (0) the image: its command runs as uid 1000, /opt/hf owned by it, SDXL_LORA_DEVICE=cuda
#   (a) python -m handler --test_input '{"input": {... a LoRA, 64x64, 2 steps}}' exits 0 with an image,
#       the LoRA cached on the root-owned volume (prepared by the entrypoint), owned by uid 1000,
#       with no fallback warning
#   (a') the same with the volume mounted read-only: served from the fallback cache, said in the log
#   (b) python -m handler --rp_serve_api: POST /runsync answers COMPLETED with an image
#   (c) the image's own SDXL_LORA_DEVICE=cuda on a machine without a usable GPU: exits non-zero
#       within CUDA_EXIT_S seconds, saying CUDA is the reason
#   (d) COMPILE=on's toolchain: Triton's own builder (the one that compiles its CUDA launcher at the
#       first compiled kernel) builds and loads a C extension as the app user (needs cc, Python.h)
#
# The LoRA is served from inside the container (python -m http.server on 127.0.0.1, the service
# allowed to fetch loopback URLs with SDXL_LORA_ALLOW_PRIVATE_URLS=1): --network none leaves the
# container no route to the host. (b)'s client runs the same way, through `docker exec` in the
# worker's own network namespace, so the worker never needs a published port or a network.
#
# Environment:
#   BASE_IMAGE       base to build on; unset: the output of ../shared/tools/local-docker-base.sh
#                    where that script exists (a local Debian that trusts this machine's TLS proxy),
#                    else Dockerfile.gpu's default (python:3.11-slim-bookworm)
#   TORCH_INDEX_URL  torch index; unset: Dockerfile.gpu's default (PyTorch's cu128), or PyPI when
#                    that index is unreachable from here (said so in the output)
#   IMAGE            tag to build (default sdxl-lora:image-test); SKIP_BUILD=1 tests it as it is
#   CUDA_EXIT_S      time limit for (c) (default 60)
set -uo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-sdxl-lora:image-test}
CUDA_EXIT_S=${CUDA_EXIT_S:-60}
LOCAL_BASE_SCRIPT=${LOCAL_BASE_SCRIPT:-../shared/tools/local-docker-base.sh}
PREFIX="sdxl-lora-image-test-$$"
failures=0
results=()

log() { printf '==> %s\n' "$*"; }
record() {  # record NAME PASS|FAIL [detail]
  results+=("$2 $1${3:+ ($3)}")
  [ "$2" = PASS ] || failures=$((failures + 1))
  printf '%s %s%s\n' "$2" "$1" "${3:+ ($3)}"
}
show() {  # the whole output of a failed check
  printf -- '----- %s -----\n' "$1"; cat "$2"; printf -- '----- end of %s -----\n' "$1"
}

work=$(mktemp -d)
cleanup() {
  docker rm -f "$PREFIX-a" "$PREFIX-api" "$PREFIX-cuda" >/dev/null 2>&1
  docker volume rm -f "$PREFIX-volume" "$PREFIX-volume-ro" >/dev/null 2>&1
  rm -rf "$work"
}
trap cleanup EXIT

# ---- build --------------------------------------------------------------------------------------
if [ "${SKIP_BUILD:-0}" != 1 ]; then
  build_args=()
  if [ -z "${BASE_IMAGE:-}" ] && [ -x "$LOCAL_BASE_SCRIPT" ]; then
    BASE_IMAGE=$("$LOCAL_BASE_SCRIPT") || { echo "FAIL $LOCAL_BASE_SCRIPT"; exit 1; }
  fi
  [ -n "${BASE_IMAGE:-}" ] && build_args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  if [ -z "${TORCH_INDEX_URL:-}" ]; then
    default_index=$(sed -n 's/^ARG TORCH_INDEX_URL=//p' Dockerfile.gpu)
    if ! curl -fsS -o /dev/null --max-time 20 "${default_index%/}/torch/" 2>/dev/null; then
      TORCH_INDEX_URL=https://pypi.org/simple
      echo "WARN: $default_index is unreachable from here: building with PyPI's torch (its CUDA 13.0 build)"
    fi
  fi
  [ -n "${TORCH_INDEX_URL:-}" ] && build_args+=(--build-arg "TORCH_INDEX_URL=$TORCH_INDEX_URL")
  # A daemon without the default bridge (dockerd --bridge=none) gives RUN steps no network.
  docker network inspect bridge >/dev/null 2>&1 || build_args+=(--network host)
  log "docker build -f Dockerfile.gpu -t $IMAGE ${build_args[*]} ."
  started=$(date +%s)
  if ! docker build -f Dockerfile.gpu -t "$IMAGE" "${build_args[@]}" . >"$work/build.log" 2>&1; then
    show "docker build" "$work/build.log"
    record build FAIL "$(( $(date +%s) - started )) s"
    exit 1
  fi
  record build PASS "$(( $(date +%s) - started )) s"
fi
size=$(docker image inspect --format '{{.Size}}' "$IMAGE") || { echo "FAIL no image $IMAGE"; exit 1; }
echo "image $IMAGE: $size bytes ($(awk -v s="$size" 'BEGIN { printf "%.2f GB", s / 1e9 }'))"

# ---- fixtures: a tiny synthetic SDXL and a LoRA for it, a root-owned volume ----------------------
[ -x .venv/bin/sdxl-lora ] || make -s setup >/dev/null || { echo "FAIL make setup"; exit 1; }
log "tiny model and LoRA in $work"
mkdir -p "$work/lora"
.venv/bin/sdxl-lora synth-model "$work/model" --size tiny >"$work/synth.log" 2>&1 \
  && .venv/bin/sdxl-lora synth-lora --model "$work/model" --out "$work/lora/char.safetensors" >>"$work/synth.log" 2>&1 \
  || { show synth "$work/synth.log"; echo "FAIL synthetic model/LoRA"; exit 1; }
chmod -R a+rX "$work"  # mktemp's 0700 would hide them from the container's uid 1000
lora_sha=$(sha256sum "$work/lora/char.safetensors" | cut -d' ' -f1)
docker volume create "$PREFIX-volume" >/dev/null  # a fresh named volume: root:root 0755, as on RunPod

request=$(cat <<EOF
{"input": {"prompt": "a character portrait", "width": 64, "height": 64, "num_inference_steps": 2, "seed": 7,
 "loras": [{"id": "char-a", "url": "http://127.0.0.1:8001/char.safetensors", "scale": 0.8, "sha256": "$lora_sha"}]}}
EOF
)
worker=(--network none -v "$work/model:/model:ro" -v "$work/lora:/lora:ro" -v "$PREFIX-volume:/runpod-volume"
        -e SDXL_LORA_DEVICE=cpu -e SDXL_LORA_MODEL=/model -e SDXL_LORA_ALLOW_PRIVATE_URLS=1
        -e SDXL_LORA_COMPILE=off)  # the image compiles by default: on a CPU that is minutes, tested elsewhere
# Serve /lora on 127.0.0.1:8001 inside the container, then exec the command given.
with_files='python -m http.server 8001 --bind 127.0.0.1 --directory /lora >/tmp/files.log 2>&1 & exec "$@"'

# ---- (0) the image itself -----------------------------------------------------------------------
docker run --rm --network none "$IMAGE" sh -c \
  'echo "uid=$(id -u) user=$(id -un) hf=$(stat -c %U "$HF_HOME") device=$SDXL_LORA_DEVICE"' >"$work/0.log" 2>&1
if grep -qx 'uid=1000 user=app hf=app device=cuda' "$work/0.log"; then
  record "(0) non-root app user, HF_HOME owned by it, SDXL_LORA_DEVICE=cuda" PASS
else
  show "(0)" "$work/0.log"; record "(0) non-root app user, HF_HOME owned by it, SDXL_LORA_DEVICE=cuda" FAIL
fi

# ---- (a) --test_input ---------------------------------------------------------------------------
# The identity model is set to a hub id the worker cannot reach (no network, nothing baked): it
# must start and serve without the score.
log "(a) python -m handler --test_input"
started=$(date +%s)
timeout 600 docker run --rm --name "$PREFIX-a" "${worker[@]}" -e SDXL_LORA_IDENTITY_MODEL=openai/clip-vit-large-patch14 \
  "$IMAGE" sh -c "$with_files" sh python -m handler --test_input "$request" >"$work/a.log" 2>&1
rc=$?
secs=$(( $(date +%s) - started ))
docker rm -f "$PREFIX-a" >/dev/null 2>&1
# the image's sha256 (ImageOut: ..., mime, sha256), not the LoRA's that the logged job input also holds
a_sha=$(grep -Eo "'mime': '[^']*', 'sha256': '[0-9a-f]{64}'" "$work/a.log" | head -1 | grep -Eo '[0-9a-f]{64}')
# The entrypoint gave the root-owned volume's sdxl-lora folder to uid 1000: the LoRA is cached there
# and the worker warns about no fallback.
docker run --rm --network none -v "$PREFIX-volume:/runpod-volume" --entrypoint sh "$IMAGE" -c \
  'stat -c "volume=%u" /runpod-volume; stat -c "loras=%u" /runpod-volume/sdxl-lora/loras; ls /runpod-volume/sdxl-lora/loras' \
  >"$work/a-volume.log" 2>&1
if [ $rc -eq 0 ] && [ -n "$a_sha" ] && grep -q "'base64': '" "$work/a.log" && ! grep -q "is not writable" "$work/a.log" \
   && grep -qx 'volume=0' "$work/a-volume.log" && grep -qx 'loras=1000' "$work/a-volume.log" \
   && grep -q 'safetensors' "$work/a-volume.log"; then
  record "(a) --test_input with a LoRA cached on the root-owned volume as uid 1000, unreachable identity model" PASS "$secs s"
  grep -E "WARNING|entrypoint:" "$work/a.log" | cut -c1-240
else
  show "(a) exit $rc" "$work/a.log"; show "(a) volume" "$work/a-volume.log"
  record "(a) --test_input with a LoRA cached on the root-owned volume as uid 1000, unreachable identity model" FAIL "exit $rc, $secs s"
fi

# ---- (a') a volume that cannot be prepared ---------------------------------------------------------
log "(a') python -m handler --test_input, volume mounted read-only"
worker_ro=("${worker[@]}")
worker_ro[7]="$PREFIX-volume-ro:/runpod-volume:ro"
docker volume create "$PREFIX-volume-ro" >/dev/null
timeout 600 docker run --rm --name "$PREFIX-a" "${worker_ro[@]}" "$IMAGE" sh -c "$with_files" sh \
  python -m handler --test_input "$request" >"$work/a-ro.log" 2>&1
rc=$?
docker rm -f "$PREFIX-a" >/dev/null 2>&1
if [ $rc -eq 0 ] && grep -q "'base64': '" "$work/a-ro.log" && grep -q "is not writable" "$work/a-ro.log"; then
  record "(a') read-only volume: served from the fallback cache, with its warning" PASS
else
  show "(a') exit $rc" "$work/a-ro.log"
  record "(a') read-only volume: served from the fallback cache, with its warning" FAIL "exit $rc"
fi

# ---- (b) --rp_serve_api, POST /runsync ----------------------------------------------------------
log "(b) python -m handler --rp_serve_api; POST /runsync through docker exec"
docker run -d --name "$PREFIX-api" "${worker[@]}" "$IMAGE" sh -c "$with_files" sh \
  python -m handler --rp_serve_api --rp_api_host 0.0.0.0 --rp_api_port 8000 >/dev/null
started=$(date +%s)
printf '%s' "$request" | docker exec -i "$PREFIX-api" python -c '
import json, sys, time, urllib.error, urllib.request
body = sys.stdin.read().encode()
deadline = time.time() + 300
while True:
    try:
        req = urllib.request.Request("http://127.0.0.1:8000/runsync", body, {"Content-Type": "application/json"})
        answer = json.load(urllib.request.urlopen(req, timeout=300))
        break
    except urllib.error.HTTPError as exc:
        text = exc.read().decode(errors="replace")[:2000]
        sys.exit(f"/runsync answered {exc.code}: {text}")
    except OSError as exc:  # not listening yet
        if time.time() > deadline:
            sys.exit(f"no answer from /runsync: {exc}")
        time.sleep(1)
image = ((answer.get("output") or {}).get("images") or [{}])[0]
print(json.dumps({k: (v[:40] + "...") if isinstance(v, str) and len(v) > 80 else v for k, v in answer.items()
                  if k != "output"} | {"image": {k: v for k, v in image.items() if k != "base64"},
                                       "loras": (answer.get("output") or {}).get("loras")}))
sys.exit(0 if answer.get("status") == "COMPLETED" and image.get("base64") else 1)
' >"$work/b.log" 2>&1
rc=$?
secs=$(( $(date +%s) - started ))
b_sha=$(grep -Eo '"mime": "[^"]*", "sha256": "[0-9a-f]{64}"' "$work/b.log" | head -1 | grep -Eo '[0-9a-f]{64}')
if [ $rc -eq 0 ] && [ -n "$a_sha" ] && [ "$a_sha" != "$b_sha" ]; then
  cat "$work/b.log"
  record "(b) --rp_serve_api: POST /runsync -> COMPLETED with an image" FAIL "not (a)'s image: $b_sha vs $a_sha"
elif [ $rc -eq 0 ]; then
  record "(b) --rp_serve_api: POST /runsync -> COMPLETED with an image" PASS "$secs s${a_sha:+, same image as (a)}"
else
  docker logs "$PREFIX-api" >"$work/b-worker.log" 2>&1
  show "(b) client, exit $rc" "$work/b.log"; show "(b) worker log" "$work/b-worker.log"
  record "(b) --rp_serve_api: POST /runsync -> COMPLETED with an image" FAIL "exit $rc, $secs s"
fi
docker rm -f "$PREFIX-api" >/dev/null 2>&1

# ---- (c) SDXL_LORA_DEVICE=cuda (the image's own) without a usable GPU -----------------------------
log "(c) python -m handler with the image's SDXL_LORA_DEVICE=cuda, no GPU"
started=$(date +%s)
# NVIDIA_VISIBLE_DEVICES=void: no GPU even where the NVIDIA runtime is docker's default.
timeout $((CUDA_EXIT_S + 30)) docker run --name "$PREFIX-cuda" --network none -v "$work/model:/model:ro" \
  -e SDXL_LORA_MODEL=/model -e NVIDIA_VISIBLE_DEVICES=void "$IMAGE" >"$work/c.log" 2>&1
rc=$?
secs=$(( $(date +%s) - started ))
docker rm -f "$PREFIX-cuda" >/dev/null 2>&1
if [ $rc -ne 0 ] && [ $rc -ne 124 ] && [ $secs -le "$CUDA_EXIT_S" ] && grep -q 'CUDA' "$work/c.log"; then
  record "(c) SDXL_LORA_DEVICE=cuda without a GPU exits non-zero naming CUDA" PASS "exit $rc, $secs s"
  grep -m3 'CUDA' "$work/c.log" | cut -c1-300
else
  show "(c) exit $rc" "$work/c.log"
  record "(c) SDXL_LORA_DEVICE=cuda without a GPU exits non-zero naming CUDA" FAIL "exit $rc, $secs s, limit ${CUDA_EXIT_S} s"
fi

# ---- (d) Triton can build its launcher (COMPILE=on on a GPU) -------------------------------------
log "(d) triton.runtime.build compiles a C extension as the app user"
probe='from triton.runtime.build import compile_module_from_src as build
src = "#include <Python.h>\nstatic struct PyModuleDef d = {PyModuleDef_HEAD_INIT, \"probe\", 0, -1, 0};\nPyMODINIT_FUNC PyInit_probe(void) { return PyModule_Create(&d); }\n"
print("built", build(src, "probe").__name__)'
docker run --rm --network none "$IMAGE" python -c "$probe" >"$work/d.log" 2>&1
if grep -qx 'built probe' "$work/d.log"; then
  record "(d) Triton builds a C extension (its CUDA launcher's path) as uid 1000" PASS
else
  show "(d)" "$work/d.log"; record "(d) Triton builds a C extension (its CUDA launcher's path) as uid 1000" FAIL
fi

echo
echo "image $IMAGE: $size bytes"
printf '%s\n' "${results[@]}"
[ $failures -eq 0 ] && echo "image-test: all checks passed" || echo "image-test: $failures check(s) failed"
exit $(( failures > 0 ))
