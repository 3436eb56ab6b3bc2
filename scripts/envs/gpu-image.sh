# The GPU machine's image, exactly: Python 3.12, torch 2.11.0 (CUDA 13 build), transformers
# 5.17.0, Triton 3.6.0. The oldest versions vtw supports; the whole suite must pass here too.
VTW_ENV_PYTHON="${VTW_PYTHON:-}"
if [ -z "$VTW_ENV_PYTHON" ]; then
  if command -v pyenv >/dev/null; then
    # pyenv (as on the project's machines): its newest installed 3.12
    v="$(pyenv versions --bare 2>/dev/null | grep -E '^3\.12\.[0-9]+$' | sort -V | tail -n1 || true)"
    [ -n "$v" ] && VTW_ENV_PYTHON="$(PYENV_VERSION="$v" pyenv which python3)"
  fi
  if [ -z "$VTW_ENV_PYTHON" ] && python3.12 -c pass 2>/dev/null; then
    VTW_ENV_PYTHON="$(command -v python3.12)"
  fi
fi
VTW_ENV_TORCH="torch==2.11.0"
VTW_ENV_PACKAGES="triton==3.6.0 transformers==5.17.0"
