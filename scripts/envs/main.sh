# The main set: the project's development versions. torch 2.14.1 is the CUDA 13 build (it
# compiles the CUDA kernels without a GPU); transformers is the newest 5.x release; Triton is
# the one torch 2.14.1 pins (3.8).
VTW_ENV_PYTHON="${VTW_PYTHON:-python3}"
VTW_ENV_TORCH="torch==2.14.1"
VTW_ENV_PACKAGES="triton>=3.6,<3.9 transformers>=5.17,<6"
