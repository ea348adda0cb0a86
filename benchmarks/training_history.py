"""Training histories of short runs on the tiny test fixtures, to compare two revisions of the training code.

    PYTHONPATH=src python benchmarks/training_history.py . params.yaml after.json
    # the same with an older checkout's src, tests and params.yaml -> before.json; compare the two
    # (benchmarks/results/training_history_b3b0720.json: the histories at b3b0720, before the model kinds;
    #  training_history_61d1050.json: before the one training loop of ptpipe.train)

Three CNN recipes (default: AdamW + onecycle + whitening freeze; tutorial: SGD constant; airbench94: SGD
nesterov + Lookahead + BN-bias lr scale), three LSTM optimizer/schedule pairs and the gpt, 3 epochs each,
one thread. The throughput columns are left out: everything else must be identical for a change that keeps
the metrics.
"""
import json
import sys
import tempfile
from pathlib import Path

import torch
import yaml

torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1] + "/tests")
from fixtures import ALICE_BODY, write_prepared_cifar, write_prepared_text  # noqa: E402

from ptpipe import train  # noqa: E402

root = Path(tempfile.mkdtemp())
write_prepared_cifar(root, 300, 100, 50)
write_prepared_text(root, ALICE_BODY.replace("\r\n", "\n"))
base = yaml.safe_load(open(sys.argv[2]).read())
out = {}


def run(label: str, model: str, data: str, edit) -> None:
    p = json.loads(json.dumps(base))
    edit(p)
    pf = root / f"params_{label}.yaml"
    pf.write_text(yaml.safe_dump(p))
    res = train.train(model, root / "data/prepared" / data, root / f"{label}.pt", None, None, pf, progress=False)
    out[label] = [{k: v for k, v in row.items() if "per_s" not in k} for row in res.history]


for recipe in ("default", "tutorial", "airbench94"):
    def edit(p, recipe=recipe):
        p["models"]["cnn"]["recipe"] = recipe
        r = p["recipes"]["cnn"][recipe]
        r.update(epochs=3, batch_size=64, threads=1, tta=0, compile="never")
        if r["arch"] == "airbench":
            r["model_args"]["widths"] = [8, 16, 16]
            r["whiten_bias_epochs"] = 1
    run(recipe, "cnn", "cifar10", edit)
for sched, opt in (("cosine", "adam"), ("constant", "sgd"), ("cosine", "adamw")):
    def edit(p, sched=sched, opt=opt):
        p["recipes"]["lstm"]["default"].update(
            epochs=3, hidden_size=32, embedding_size=32, batch_size=4, seq_len=20, eval_streams=2, schedule=sched,
            optimizer=opt, weight_decay=0.01 if opt == "adamw" else 0.0, patience=None, threads=1)
    run(f"lstm-{sched}-{opt}", "lstm", "alice", edit)
run("gpt", "gpt", "alice", lambda p: p["recipes"]["gpt"]["default"].update(
    epochs=3, steps_per_epoch=5, n_layer=2, n_embd=32, n_head=2, block_size=32, batch_size=4, eval_stride=16,
    threads=1))
Path(sys.argv[3]).write_text(json.dumps(out, indent=1) + "\n")
