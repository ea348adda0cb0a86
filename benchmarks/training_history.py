"""Training histories of short runs on the tiny test fixtures, to compare two revisions of the training code.

    PYTHONPATH=src python benchmarks/training_history.py . params.yaml after.json
    # the same with PYTHONPATH=<older checkout>/src, its tests and params.yaml -> before.json; compare the two
    # (benchmarks/results/training_history_b3b0720.json: the histories at b3b0720, before the model kinds)

Three CNN recipes (default: AdamW + onecycle + whitening freeze; tutorial: SGD constant; airbench94: SGD
nesterov + Lookahead + BN-bias lr scale) and three LSTM optimizer/schedule pairs, 3 epochs each, one thread.
The throughput columns are left out: everything else must be identical for a change that keeps the metrics.
"""
import json, sys, tempfile
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path.insert(0, sys.argv[1] + "/tests")
from fixtures import write_prepared_cifar, write_prepared_text, ALICE_BODY
import yaml
from ptpipe import train_cnn, train_lstm

root = Path(tempfile.mkdtemp())
write_prepared_cifar(root, 300, 100, 50)
write_prepared_text(root, ALICE_BODY.replace("\r\n", "\n"))
base = yaml.safe_load(open(sys.argv[2]).read())
out = {}
for recipe in ("default", "tutorial", "airbench94"):
    p = json.loads(json.dumps(base))
    p["cnn"]["recipe"] = recipe
    r = p["cnn"]["recipes"][recipe]
    r.update(epochs=3, batch_size=64, threads=1, tta=0, compile="never")
    if r["arch"] == "airbench":
        r["model_args"]["widths"] = [8, 16, 16]
        r["whiten_bias_epochs"] = 1
    pf = root / f"params_{recipe}.yaml"
    pf.write_text(yaml.safe_dump(p))
    res = train_cnn.main(pf, root / "data/prepared/cifar10", root / f"m_{recipe}.pt", None, root / f"t_{recipe}.json", progress=False)
    out[recipe] = [{k: v for k, v in row.items() if "per_s" not in k} for row in res.history]
for sched, opt in (("cosine", "adam"), ("constant", "sgd"), ("cosine", "adamw")):
    p = json.loads(json.dumps(base))
    p["lstm"].update(epochs=3, hidden_size=32, embedding_size=32, batch_size=4, seq_len=20, eval_streams=2,
                     schedule=sched, optimizer=opt, weight_decay=0.01 if opt == "adamw" else 0.0, patience=None, threads=1)
    pf = root / "params_lstm.yaml"
    pf.write_text(yaml.safe_dump(p))
    res = train_lstm.main(pf, root / "data/prepared/alice", root / "lstm.pt", None, progress=False)
    out[f"lstm-{sched}-{opt}"] = [{k: v for k, v in row.items() if "per_s" not in k} for row in res.history]
Path(sys.argv[3]).write_text(json.dumps(out, indent=1) + "\n")
