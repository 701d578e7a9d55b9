import os

import torch

# Without a GPU, Triton kernels are tested in the CPU interpreter. Triton reads this when a kernel is
# decorated, so it must be set before any dgr_fast kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(os.path.dirname(__file__), "..", "build", "triton-cache"))
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
