# vtw_find_python X.Y: prints the path of a Python X.Y interpreter (pyenv's newest installed X.Y,
# as on the project's machines, else pythonX.Y on PATH), or nothing. Sourced by the version sets
# in scripts/envs/.
vtw_find_python() {
  local want="$1" v=""
  if command -v pyenv >/dev/null; then
    v="$(pyenv versions --bare 2>/dev/null | grep -E "^${want//./\\.}\.[0-9]+$" | sort -V | tail -n1 || true)"
    if [ -n "$v" ]; then
      PYENV_VERSION="$v" pyenv which python3
      return 0
    fi
  fi
  if "python$want" -c pass 2>/dev/null; then
    command -v "python$want"
  fi
  return 0
}
