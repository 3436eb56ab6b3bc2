# The GPU machine's image, exactly: Python 3.12, torch 2.11.0 (CUDA 13 build), transformers
# 5.17.0, Triton 3.6.0. The oldest versions vtw supports; the whole suite must pass here too.
# shellcheck disable=SC1091
source "$(dirname "${BASH_SOURCE[0]}")/../find_python.sh"
VTW_ENV_PYTHON="${VTW_PYTHON:-$(vtw_find_python 3.12)}"
VTW_ENV_TORCH="torch==2.11.0"
VTW_ENV_PACKAGES="triton==3.6.0 transformers==5.17.0"
