"""The plumbing around Algorithm 1 (`segue_dist/train.py` holds the algorithm itself).

`config` (TrainConfig and its parts), `runtime` (process, device, precision; the DDP / DeepSpeed `Runner`),
`build` (ŷ, models, data stream: everything `train` needs before its first epoch), `resume` (exact-resume
checkpoints), `history` (per-epoch records and metrics.jsonl / TensorBoard), `summary` (export, final table, summary
JSON).
"""
