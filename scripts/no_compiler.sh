#!/usr/bin/env bash
# Run a command with no C/C++ compiler reachable: CC and CXX name a program that fails, PATH holds only
# symlinks to the few tools an install needs (no cc, gcc, g++, c++, clang, cmake), and pip takes wheels only
# (PIP_ONLY_BINARY=:all:), so neither a source package nor a wheel pip once built from one can slip in.
#     scripts/no_compiler.sh make setup      # CI (.ci/run): the venv every later step uses
set -euo pipefail
shim="$(mktemp -d)"
trap 'rm -rf "$shim"' EXIT
# the real interpreter, not a pyenv shim (a shell script that needs more on PATH); exec'd, not symlinked:
# `python3 -m venv` links the venv to the path it was started by, and this folder is removed at the end
python="$(python3 -c 'import os, sys; print(os.path.realpath(sys.executable))')"
printf '#!/bin/sh\nexec "%s" "$@"\n' "$python" > "$shim/python3"
chmod +x "$shim/python3"
for tool in make sh bash env touch mkdir rm cp mv cat ls sed grep uname; do
  found="$(command -v "$tool" || true)"
  [ -n "$found" ] && ln -s "$found" "$shim/$tool"
done
cat > "$shim/no-compiler" <<'SH'
#!/bin/sh
echo "no-compiler check: something tried to run a C/C++ compiler ($0 $*)" >&2
exit 1
SH
chmod +x "$shim/no-compiler"
for cc in cc gcc g++ c++ clang clang++ cmake; do
  if PATH="$shim" command -v "$cc" >/dev/null 2>&1; then echo "no_compiler.sh: $cc is reachable" >&2; exit 1; fi
done
echo "no_compiler.sh: running '$*' with PATH=$shim (no compiler), CC=CXX=$shim/no-compiler, PIP_ONLY_BINARY=:all:"
PATH="$shim" CC="$shim/no-compiler" CXX="$shim/no-compiler" PIP_ONLY_BINARY=":all:" "$@"
