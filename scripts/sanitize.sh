#!/usr/bin/env bash
# Builds p2pvpn._gcm and p2pvpn._fastpath with AddressSanitizer and UndefinedBehaviorSanitizer
# into a separate venv (.venv-asan) and runs the data-plane tests, the compiled
# crypto tests and the data-plane fuzzing against that build. Any sanitizer
# report fails the script.
#
#   bash scripts/sanitize.sh                 # what CI runs (.ci/run)
#   bash scripts/sanitize.sh -k coalesced    # extra arguments go to pytest
#
# The in-place modules that .venv uses (src/p2pvpn/*.so) are never touched:
# the build happens in a copy of the tree, and the tests run from that copy,
# whose src/ holds the sanitized modules and comes first on sys.path.
#
# Environment:
#   P2PVPN_SANITIZE_EXAMPLES  hypothesis examples per fuzz property (default 400)
#   P2PVPN_SANITIZE_KEEP=1    keep the build tree and logs (printed at the end)
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.venv-asan"
sanitize_flags="-fsanitize=address,undefined -fno-omit-frame-pointer -fno-sanitize-recover=all"

if [ "${CI:-}" = true ] && [ "$(id -u)" = 0 ]; then
    # libasan and libubsan ship with gcc; python3-dev and libssl-dev build the module.
    echo "== sanitizer build: system packages"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        gcc python3-dev python3-venv libssl-dev binutils >/dev/null
fi

echo "== sanitizer build: python environment (.venv-asan)"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
requirements="$(mktemp)"
# The project's own pins: build requirements, runtime dependencies, test extras.
python3 - "$requirements" <<'EOF'
import sys
import tomllib

with open("pyproject.toml", "rb") as file:
    project = tomllib.load(file)
wanted = (
    project["build-system"]["requires"]
    + project["project"]["dependencies"]
    + project["project"]["optional-dependencies"]["test"]
)
with open(sys.argv[1], "w") as out:
    out.write("\n".join(wanted) + "\n")
EOF
"$venv/bin/python" -m pip install -q --upgrade pip
"$venv/bin/python" -m pip install -q -r "$requirements"
rm -f "$requirements"

work="$(mktemp -d /tmp/p2pvpn-asan.XXXXXX)"
cleanup() {
    if [ "${P2PVPN_SANITIZE_KEEP:-}" = 1 ]; then
        echo "kept: $work"
    else
        rm -rf "$work"
    fi
}
trap cleanup EXIT
tree="$work/main"
logs="$work/logs"
mkdir -p "$tree" "$logs"
# The working tree, uncommitted files included, without anything built in it.
tar -C "$root" -cf - --exclude='*.so' --exclude='__pycache__' --exclude='*.egg-info' \
    --exclude='src/p2pvpn/*.c' --exclude='.hypothesis' \
    src tests fuzz setup.py pyproject.toml MANIFEST.in README.md | tar -C "$tree" -xf -
# setup.py's -O3 comes after CFLAGS on the compiler's command line and would
# win; -O1 keeps stack traces close to the source.
sed -i 's/extra_compile_args=\["-O3"\]/extra_compile_args=[]/' "$tree/setup.py"

echo "== sanitizer build: compiling _gcm and _fastpath with $sanitize_flags"
(
    cd "$tree"
    CFLAGS="$sanitize_flags -g -O1" LDFLAGS="$sanitize_flags" \
        "$venv/bin/python" setup.py -q build_ext --inplace >"$logs/build.log" 2>&1
) || { cat "$logs/build.log"; exit 1; }
for name in _gcm _fastpath; do
    module="$(ls "$tree"/src/p2pvpn/$name*.so)"
    # Into a variable first: `nm | grep -q` under pipefail fails whenever grep
    # stops reading before nm has written everything (SIGPIPE).
    symbols="$(nm -D "$module")"
    if ! grep -q ' U __asan_report' <<<"$symbols" || ! grep -q ' U __ubsan_handle' <<<"$symbols"; then
        echo "sanitize: $module is not instrumented" >&2
        exit 1
    fi
done

# The runtimes must be loaded before anything else in the process: preload
# both (the extension's own DT_NEEDED entries come too late for ASan).
asan_runtime="$(gcc -print-file-name=libasan.so)"
ubsan_runtime="$(gcc -print-file-name=libubsan.so)"
export LD_PRELOAD="$asan_runtime $ubsan_runtime"
# CPython leaks by design at exit; anything else is reported and aborts.
# Reports go to files as well: pytest captures fd 2, and a process that
# aborts mid-test loses its captured output.
export ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:halt_on_error=1:log_path=$logs/asan:log_exe_name=1"
export UBSAN_OPTIONS="halt_on_error=1:abort_on_error=1:print_stacktrace=1:log_path=$logs/ubsan"
# The system allocator for Python objects: ASan then sees every buffer's bounds.
export PYTHONMALLOC=malloc
export P2PVPN_FUZZ_EXAMPLES="${P2PVPN_SANITIZE_EXAMPLES:-400}"

cd "$tree"
loaded="$(PYTHONPATH=src "$venv/bin/python" -c \
    'import p2pvpn._fastpath as f, p2pvpn._gcm as g; print(f.__file__); print(g.__file__)')"
expected="$(ls "$tree"/src/p2pvpn/_fastpath*.so "$tree"/src/p2pvpn/_gcm*.so)"
if [ "$loaded" != "$expected" ]; then
    echo "sanitize: the tests would import $loaded, not the sanitized $expected" >&2
    exit 1
fi
echo "== sanitizer run:" $loaded

status=0
# pythonpath comes from pyproject.toml: this copy's src/, holding the sanitized module.
# --capture=sys: a report written to fd 2 by a process that then aborts
# would be lost in pytest's fd capture; this way it reaches the log.
"$venv/bin/python" -m pytest -q -p no:cacheprovider --capture=sys \
    tests/dataplane tests/test_fastpath_crypto.py \
    tests/fuzz/test_fuzz_dataplane.py tests/fuzz/test_atheris_short.py \
    "$@" 2>&1 | tee "$logs/pytest.log" || status=$?

reports="$(cat "$logs"/asan* "$logs"/ubsan* 2>/dev/null || true)"
if [ -n "$reports" ] || grep -qE 'ERROR: AddressSanitizer|runtime error:|SUMMARY: [A-Za-z]*Sanitizer' "$logs/pytest.log"; then
    echo "== sanitizer reports"
    printf '%s\n' "$reports"
    grep -E -A40 'ERROR: AddressSanitizer|runtime error:' "$logs/pytest.log" || true
    echo "sanitize: FAILED: the sanitizers reported errors" >&2
    exit 1
fi
if [ "$status" != 0 ]; then
    echo "sanitize: FAILED: pytest exited with $status" >&2
    exit "$status"
fi
echo "sanitize: OK, no sanitizer reports"
