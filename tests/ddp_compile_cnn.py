"""torchrun target for tests/test_distributed.py: train@cnn (train.train) under DDP (gloo) with torch.compile's
aot_eager backend (inductor's C++ code generation is too slow for a test on this CPU).

    torchrun --standalone --nproc-per-node 2 tests/ddp_compile_cnn.py   (in a folder with params.yaml and data/)
"""
from pathlib import Path

from ptpipe import train
from ptpipe.kinds import cnn

cnn.COMPILE_BACKEND = "aot_eager"
train.train("cnn", Path("data/prepared/cifar10"), Path("models/cnn/model.pt"), Path("dvclive/cnn"),
            Path("metrics/cnn/train.json"), progress=False)
