"""Score a checkpoint: `python evaluate.py ckpt_path=<run>/checkpoints/<file>.ckpt`; see configs/eval.yaml."""

from zoo.cli import evaluate_main

if __name__ == "__main__":
    evaluate_main()
