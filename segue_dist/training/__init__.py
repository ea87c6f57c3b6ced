"""The plumbing around Algorithm 1 (`segue_dist/train.py` holds the algorithm itself).

`config` (TrainConfig and its parts), `runtime` (process, device, precision; the DDP / DeepSpeed `Runner`),
`build` (ŷ, models, data stream: everything `train` needs before its first epoch), `run_state` (where a run stands
and why it stops: `RunState`, `StopReason`), `resume` (exact-resume checkpoints), `history` (per-epoch records and
metrics.jsonl / TensorBoard), `summary` (export, final table, summary JSON).
"""
