#!/usr/bin/env bash
# Create the project venv (.venv) with plain pip, or reuse it when pyproject.toml has not changed since it was
# installed (the stamp holds pyproject's sha256), so repeated CI runs and demos skip the ~2 min install.
set -euo pipefail
cd "$(dirname "$0")/.."
stamp=.venv/.avel-install-stamp
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
echo "installing the project into .venv (a few minutes the first time)..." >&2
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[test]' 2> >(grep -v "^WARNING: Location" >&2)
echo "$want" > "$stamp"
