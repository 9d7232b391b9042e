#!/usr/bin/env bash
# Build llama.cpp's llama-server from the llama.cpp source vendored in the installed
# llama-cpp-python's sdist (the very llama.cpp vlmduo runs in-process), for the tests
# of remote agents (tests/test_remote_llama_server.py).
#
# The binary goes to a cache outside the repository, reused when present:
#   ${LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-~/.cache}/vlmduo/llama-server-VERSION}/bin/llama-server
# Only the llama-server target is built (static, no curl, no OpenSSL, no web UI
# download), once: later runs find it. Prints the binary's path on stdout.
#
#   bash scripts/build_llama_server.sh            # build (or find) it
#   export LLAMA_SERVER_BIN=$(bash scripts/build_llama_server.sh)
set -euo pipefail

python=${PYTHON:-python}
version=$("$python" -c "from importlib.metadata import version; print(version('llama-cpp-python'))")
cache=${LLAMA_SERVER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/vlmduo/llama-server-$version}
binary="$cache/bin/llama-server"
if [ -x "$binary" ]; then
    echo "$binary"
    exit 0
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "building llama-server $version into $cache (sources: llama-cpp-python $version sdist)" >&2
"$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-*.tar.gz -C "$work"
source_dir=$(echo "$work"/llama_cpp_python-*/vendor/llama.cpp)
cmake -S "$source_dir" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=ON \
    -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >&2
cmake --build "$work/build" --target llama-server -j "${LLAMA_SERVER_JOBS:-2}" >&2
mkdir -p "$cache/bin.tmp"
cp "$work/build/bin/llama-server" "$cache/bin.tmp/"
"$cache/bin.tmp/llama-server" --version >&2
rm -rf "$cache/bin" && mv "$cache/bin.tmp" "$cache/bin"  # appears whole or not at all
echo "$binary"
