"""torchrun target for tests/test_distributed.py: train_cnn.main under DDP (gloo) with torch.compile's
aot_eager backend (inductor's C++ code generation is too slow for a test on this CPU)."""
from ptpipe import train_cnn

train_cnn.COMPILE_BACKEND = "aot_eager"
train_cnn.main(progress=False)
