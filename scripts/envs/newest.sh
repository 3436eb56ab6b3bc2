# The newest set, the default (`main` before issue 17): the newest releases vtw supports.
# Python 3.13, torch 2.15.0 (the CUDA 13 build: it compiles the CUDA kernels without a GPU),
# the Triton it pins (3.9.0), and the newest transformers 5.x.
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/../find_python.sh"
VTW_ENV_PYTHON="${VTW_PYTHON:-$(vtw_find_python 3.13)}"
VTW_ENV_PYTHON_HINT="Python 3.13 (not found via pyenv nor as python3.13: install it, e.g. 'pyenv install 3.13', or point VTW_PYTHON at a 3.10-3.13 interpreter)"
VTW_ENV_TORCH="torch==2.15.0"
VTW_ENV_PACKAGES="triton==3.9.0 transformers>=5.17,<6"
# A machine-wide pip constraints file may cap torch below 2.15 (the project's machines cap it at
# 2.14.1: /etc/xdg/pip/constraints.txt). This set asks for 2.15.0 explicitly, so it lifts such
# a cap for its own installs only (an empty constraints file; PIP_CONSTRAINT overrides pip's
# configuration files).
export PIP_CONSTRAINT=/dev/null
