#!/usr/bin/env bash
# Build the reference environment the parity fixtures are generated in: LAVIS 1.0.2 (the code behind
# PNP-VQA's and Img2LLM's published numbers) with the transformers it pins (4.26.1). It cannot share a
# venv with capvqa (transformers 5), so it lives apart; the tests never need it, only regeneration does.
#
#   bash tests/parity/reference/make_reference_venv.sh [VENV_DIR]   # default: .reference-venv
#
# torch 2.14.1 + torchvision 0.29.1 are a matching pair (on x86_64 a CUDA build, which runs on CPU too);
# LAVIS 1.0.2 needs numpy < 2 and a pandas built against it. No file in site-packages is edited: the
# generators redirect LAVIS's hub downloads to local files from their own code.
set -euo pipefail
VENV=${1:-.reference-venv}
PYTHON=${PYTHON:-python3.11}
"$PYTHON" -m venv "$VENV"
"$VENV/bin/pip" install torch==2.14.1 torchvision==0.29.1
"$VENV/bin/pip" install salesforce-lavis==1.0.2
"$VENV/bin/pip" install "numpy<2" "pandas<2.3"
"$VENV/bin/python" -c "import lavis, transformers; print('LAVIS reference venv ready, transformers', transformers.__version__)"
