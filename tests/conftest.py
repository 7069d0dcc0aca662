import os

import torch


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The tiny models are dominated by per-op overhead: one thread is as fast, and does not thrash a busy 2-core machine.
torch.set_num_threads(1)
