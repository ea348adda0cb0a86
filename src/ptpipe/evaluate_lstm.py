"""Stage `evaluate_lstm`: how well the trained LSTM predicts the validation text, and samples of its text.

    python -m ptpipe.evaluate_lstm   # reads params.yaml (lstm.eval_streams, lstm.seq_len, lstm.threads, lstm.sample)

Writes metrics/lstm.json (val loss in nats/char, perplexity, bits/char beside the unigram
baseline from prepare's stats.json) and reports/lstm_samples.txt (one sample per temperature,
fixed seed). Runs on the CPU, so the samples are the same text on every machine.
"""
from __future__ import annotations

import math
from pathlib import Path

from ptpipe import data, files, params, stage, trainer
from ptpipe.generate import generate
from ptpipe.kinds.lstm import bits, check_lengths, load_model, stream_loss
from ptpipe.stage import StageError


def main(params_file: str | Path = "params.yaml", prepared_dir: str | Path = "data/prepared/alice",
         model_path: str | Path = "models/lstm/model.pt", metrics_path: str | Path = "metrics/lstm.json",
         samples_path: str | Path = "reports/lstm_samples.txt") -> dict:
    p = params.load(params_file)  # before anything is written
    cfg = p.lstm
    trainer.set_threads(cfg.threads)
    model, config = load_model(model_path)
    vocab = config["data"]["vocab"]
    _, val_ids, data_vocab = data.load_text(prepared_dir)
    if vocab != data_vocab:
        raise StageError(f"{model_path} was trained on another vocabulary than {prepared_dir}: "
                         f"run `dvc repro train_lstm`")
    check_lengths(None, val_ids.numel(), cfg.batch_size, cfg.seq_len, cfg.eval_streams)
    stats = data.load_stats(prepared_dir)

    nats, n = stream_loss(model, val_ids, cfg.eval_streams, cfg.seq_len)
    loss = nats / n
    metrics = {
        "val_loss_nats_per_char": loss,
        "val_perplexity": math.exp(loss),
        "val_bits_per_char": bits(loss),
        "val_characters_predicted": n,
        # What a model that ignores context scores: train-split entropy, and the val text under it.
        "unigram_bits_per_char": stats.get("unigram_bits_per_char"),
        "unigram_val_bits_per_char": stats.get("unigram_val_bits_per_char"),
    }

    s = cfg.sample
    blocks = []
    for temperature in s.temperatures:
        text = generate(model, config, s.prompt, s.length, temperature, s.seed)
        blocks.append(f"=== temperature {temperature:g}, seed {s.seed}, prompt {s.prompt!r} ===\n{text}\n")
    files.write_json(metrics_path, metrics)
    files.write_text(samples_path, "\n".join(blocks))
    print(f"val {metrics['val_bits_per_char']:.3f} bits/char (perplexity {metrics['val_perplexity']:.2f}); "
          f"unigram baseline {metrics['unigram_bits_per_char']} bits/char; wrote {metrics_path}, {samples_path}")
    return metrics


def _cli() -> None:
    args = stage.parser(__doc__, prepared="data/prepared/alice", model="models/lstm/model.pt",
                        metrics="metrics/lstm.json", samples="reports/lstm_samples.txt").parse_args()
    stage.run(main, args.params, args.prepared, args.model, args.metrics, args.samples)


if __name__ == "__main__":
    _cli()
